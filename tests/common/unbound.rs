//! An unbound DNS server on a free loopback port serving a static local zone whose data
//! tests change at run time with `unbound-control` (remote control on another free
//! loopback port, without certificates). Killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::{DEADLINE, TempDir, wait_until};

pub struct Unbound {
    pub port: u16,
    control_port: u16,
    dir: TempDir,
    conf: std::path::PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    // A port free for both UDP and TCP right now.
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port for both udp and tcp");
}

impl Unbound {
    /// Serves zone `zone` (e.g. `disc.test.`) with `data` (local-data records, in zone
    /// file syntax) once it answers for the zone's SOA.
    pub async fn start(zone: &str, data: &[&str]) -> Unbound {
        let dir = TempDir::new("unbound-discover");
        let conf = dir.join("unbound.conf");
        let mut unbound = Unbound {
            port: free_port(),
            control_port: free_port(),
            dir,
            conf,
            child: None,
        };
        unbound.write_conf(zone, data);
        unbound.spawn().await;
        unbound
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn write_conf(&self, zone: &str, data: &[&str]) {
        let dir = self.dir.path.display().to_string();
        let mut text = format!(
            r#"server:
  interface: 127.0.0.1
  port: {port}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{dir}"
  pidfile: "{dir}/unbound.pid"
  use-syslog: no
  logfile: "{dir}/unbound.log"
  verbosity: 0
  do-ip6: no
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  local-zone: "{zone}" static
"#,
            port = self.port,
        );
        for record in data {
            // A TXT record's own quotes need the other kind around it.
            let line = if record.contains('"') {
                format!("  local-data: '{record}'\n")
            } else {
                format!("  local-data: \"{record}\"\n")
            };
            text.push_str(&line);
        }
        text.push_str(&format!(
            "remote-control:\n  control-enable: yes\n  control-use-cert: no\n  control-interface: 127.0.0.1\n  control-port: {}\n",
            self.control_port
        ));
        std::fs::write(&self.conf, text).unwrap();
    }

    async fn spawn(&mut self) {
        let child = Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unbound starts");
        self.child = Some(child);
        let conf = self.conf.clone();
        wait_until(DEADLINE, "unbound to take control commands", || {
            let conf = conf.clone();
            async move { control(&conf, &["status"]).await.is_ok() }
        })
        .await;
    }

    /// `unbound-control local_data RECORD`.
    pub async fn add(&self, record: &str) {
        control(&self.conf, &["local_data", record])
            .await
            .unwrap_or_else(|e| panic!("local_data {record}: {e}"));
    }

    /// `unbound-control local_data_remove NAME`: every record of NAME.
    pub async fn remove(&self, name: &str) {
        control(&self.conf, &["local_data_remove", name])
            .await
            .unwrap_or_else(|e| panic!("local_data_remove {name}: {e}"));
    }

    /// Replaces every record of `name` with `records`.
    pub async fn set(&self, name: &str, records: &[&str]) {
        self.remove(name).await;
        for r in records {
            self.add(r).await;
        }
    }

    /// Starts it again after `kill`, with the data it was started with.
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn control(conf: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new("unbound-control")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() && !out.starts_with("error") {
        Ok(out)
    } else {
        Err(format!("{out}{}", String::from_utf8_lossy(&output.stderr)))
    }
}
