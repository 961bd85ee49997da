//! regmirror started as an operator would (the binary, a config file), for
//! tests that need no upstream: only the plain listener and one Docker Hub
//! upstream at an address where nothing answers (127.0.0.9).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Writes `dir/config.toml` with the plain listener on `http`, the CA and
/// store under `dir`, and `upstream_hosts` intercepted for Docker Hub.
pub fn write_config(dir: &Path, http: &str, upstream_hosts: &[&str]) -> PathBuf {
    let hosts: Vec<String> = upstream_hosts.iter().map(|h| format!("{h:?}")).collect();
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
http = "{http}"
name = "regmirror.test"
[ca]
dir = "{d}/certs"
[cache]
dir = "{d}/data"
max_size = "1GiB"
[[upstream]]
name = "docker.io"
hosts = [{hosts}]
url = "http://127.0.0.9"
namespace = "dockerhub"
"#,
            d = dir.display(),
            hosts = hosts.join(", ")
        ),
    )
    .expect("write config.toml");
    cfg
}

/// A running `regmirror serve`, killed on drop.
pub struct Serving(pub Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `regmirror [global_args] serve --config cfg` with stderr as given.
pub fn spawn(cfg: &Path, global_args: &[&str], stderr: Stdio) -> Serving {
    Serving(
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(global_args)
            .args(["serve", "--config"])
            .arg(cfg)
            .stderr(stderr)
            .spawn()
            .expect("start regmirror serve"),
    )
}

/// Waits until `addr` accepts connections, failing loudly after 15 s.
pub fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "regmirror on {addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// regmirror's stderr lines up to its first "listener ready" (at most 40).
pub fn stderr_until_ready(child: &mut Child) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("read stderr");
        let ready = line.contains("listener ready");
        lines.push(line);
        if ready || lines.len() > 40 {
            break;
        }
    }
    lines
}
