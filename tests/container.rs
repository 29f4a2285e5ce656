//! The container image's entrypoint, run as the image would run it, without a container
//! engine: the user, working directory, command and config are read from
//! deploy/container/Containerfile itself, and weir runs under `setpriv` (that uid, no
//! groups) in a private mount and network namespace (`unshare`), with a fresh /run as the
//! image has it. It must start, create its admin socket as that user, answer `/ready` on
//! the metrics port of the Kubernetes manifests, accept on its listener's published port,
//! and exit 0 on SIGTERM. Needs root, `unshare` and `setpriv` (util-linux); skipped
//! otherwise, a failure under `WEIR_REQUIRE_EXTERNAL=1`.

mod common;

use std::process::Command;

const CONTAINERFILE: &str = include_str!("../deploy/container/Containerfile");

/// The last value of a Containerfile instruction (`USER`, `WORKDIR`, …).
fn instruction<'a>(name: &str) -> &'a str {
    (CONTAINERFILE.lines().rev())
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("the Containerfile has no {name}"))
        .trim()
}

#[test]
fn the_image_entrypoint_starts_as_its_user_and_serves() {
    assert!(
        CONTAINERFILE.starts_with("# syntax="),
        "`# syntax=` must be the first line"
    );
    if !common::require_program("unshare") || !common::require_program("setpriv") {
        return;
    }
    if !common::patroni::is_root() {
        if std::env::var_os("WEIR_REQUIRE_EXTERNAL").is_some_and(|v| v == "1") {
            panic!("the container test needs root, and WEIR_REQUIRE_EXTERNAL=1");
        }
        eprintln!("SKIPPED: the container test needs root (setpriv, unshare)");
        return;
    }
    let user = instruction("USER");
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let workdir = instruction("WORKDIR");
    let cmd = instruction("CMD");
    // The config the image runs is the one it copies in.
    let config_in_image = (CONTAINERFILE.lines())
        .find_map(|l| {
            let rest = l.strip_prefix("COPY deploy/container/weir.yaml ")?;
            Some(rest.trim())
        })
        .expect("the image copies deploy/container/weir.yaml");
    assert!(
        cmd.contains(&format!("\"{config_in_image}\"")),
        "CMD runs the copied config: {cmd}"
    );
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/container/weir.yaml");
    let text = std::fs::read_to_string(config).unwrap();
    assert!(
        text.contains("socket: /run/weir/admin.sock"),
        "an absolute socket in /run/weir"
    );
    assert!(
        text.contains("bind: 0.0.0.0:9490"),
        "metrics on the manifests' port"
    );
    let manifests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/deployment.yaml"
    ))
    .unwrap();
    assert!(
        manifests.contains("containerPort: 9490"),
        "the Deployment exposes 9490"
    );

    let weir = env!("CARGO_BIN_EXE_weir");
    let script = format!(
        r#"set -e
ip link set lo up
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mkdir -p /run/weir && chown {uid}:{gid} /run/weir
cd {workdir}
setpriv --reuid {uid} --regid {gid} --clear-groups {weir} run -c {config} 2>/run/weir.log &
pid=$!
for i in $(seq 100); do
  {weir} ctl -s /run/weir/admin.sock show info >/dev/null 2>&1 && break
  sleep 0.1
done
echo "socket owner: $(stat -c %u /run/weir/admin.sock)"
echo "process uid: $(stat -c %u /proc/$pid)"
{weir} ctl -s /run/weir/admin.sock show info
exec 3<>/dev/tcp/127.0.0.1/9490
printf 'GET /ready HTTP/1.0\r\n\r\n' >&3
cat <&3
exec 3<&-
exec 4<>/dev/tcp/127.0.0.1/5432 && echo "listener accepts on 5432"
exec 4<&-
kill -TERM $pid
set +e
wait $pid
echo "exit $?"
echo "--- log"
cat /run/weir.log
"#
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--fork",
            "--kill-child",
            "--",
            "bash",
            "-c",
            &script,
        ])
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let said = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{said}");
    assert!(stdout.contains(&format!("socket owner: {uid}")), "{said}");
    assert!(stdout.contains(&format!("process uid: {uid}")), "{said}");
    assert!(
        stdout.contains(" 200 OK") && stdout.contains("\nready"),
        "{said}"
    );
    assert!(stdout.contains("listener accepts on 5432"), "{said}");
    assert!(stdout.contains("exit 0"), "{said}");
}
