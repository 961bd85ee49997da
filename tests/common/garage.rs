//! A real Garage cluster on loopback: `n` nodes, each on its own loopback
//! address, `replication_factor = 3`, one bucket and one access key, made
//! with Garage's own CLI as an operator would.
//!
//! The binary comes from `REGMIRROR_GARAGE_BIN`, or where `scripts/test.sh`
//! installs it (`cargo install --locked garage`); a missing binary fails the
//! test, never skips it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where scripts/test.sh installs Garage (kept between CI runs).
pub const DEFAULT_GARAGE_BIN: &str = "/var/cache/regmirror-ci/garage/bin/garage";
const S3_PORT: u16 = 3900;
const RPC_PORT: u16 = 3901;
/// The access key every test uses (Garage's format: `GK` and 24 hex digits).
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET_KEY: &str = "5ec2e7d0c0ffee5ec2e7d0c0ffee5ec2e7d0c0ffee5ec2e7d0c0ffee5ec2e7d0";
const RPC_SECRET: &str = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6";
pub const REGION: &str = "garage";

pub fn garage_bin() -> PathBuf {
    let bin = std::env::var_os("REGMIRROR_GARAGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_GARAGE_BIN));
    assert!(
        bin.is_file(),
        "Garage is not installed at {} (scripts/test.sh installs it with \
         `cargo install --locked garage --root /var/cache/regmirror-ci/garage`; \
         or set REGMIRROR_GARAGE_BIN)",
        bin.display()
    );
    bin
}

struct Node {
    ip: IpAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct GarageCluster {
    nodes: Vec<Node>,
    pub bucket: String,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl GarageCluster {
    /// Starts `n` (at least 3) nodes, joins them into one layout, and
    /// creates `bucket` with [`KEY_ID`] allowed to read and write it.
    pub fn start(n: usize, bucket: &str) -> GarageCluster {
        assert!(n >= 3, "replication_factor 3 needs 3 nodes");
        let bin = garage_bin();
        let dir = super::tempdir("garage-");
        let mut nodes = Vec::new();
        for i in 0..n {
            let ip = super::alloc_ip();
            let d = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&d).expect("garage node dir");
            let config = d.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = {meta:?}\ndata_dir = {data:?}\ndb_engine = \"sqlite\"\n\
                     replication_factor = 3\nrpc_secret = \"{RPC_SECRET}\"\n\
                     rpc_bind_addr = \"{ip}:{RPC_PORT}\"\nrpc_public_addr = \"{ip}:{RPC_PORT}\"\n\
                     [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"{ip}:{S3_PORT}\"\n",
                    meta = d.join("meta").display().to_string(),
                    data = d.join("data").display().to_string(),
                ),
            )
            .expect("garage config");
            nodes.push(Node {
                ip,
                log: d.join("garage.log"),
                config,
                child: None,
            });
        }
        let mut c = GarageCluster {
            nodes,
            bucket: bucket.to_string(),
            bin,
            _dir: dir,
        };
        for i in 0..n {
            c.start_node(i);
        }
        let ids: Vec<String> = (0..n).map(|i| c.node_id(i)).collect();
        for id in &ids[1..] {
            c.cli(0, &["node", "connect", id]);
        }
        for id in &ids {
            let short = &id[..16];
            c.cli(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        c.cli(0, &["layout", "apply", "--version", "1"]);
        c.cli(0, &["key", "import", "--yes", "-n", "regmirror", KEY_ID, SECRET_KEY]);
        c.cli(0, &["bucket", "create", bucket]);
        c.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", KEY_ID,
            ],
        );
        c
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}:{S3_PORT}", self.nodes[i].ip)
    }

    pub fn s3_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.nodes[i].ip, S3_PORT)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The S3 backend's `[cache]` keys for the bucket through node `i`,
    /// keys under `prefix` (`dir` and `max_size` are the caller's).
    pub fn cache_keys(&self, i: usize, prefix: &str) -> String {
        format!(
            "backend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\nregion = \"{REGION}\"\nprefix = \"{prefix}\"\n",
            bucket = self.bucket,
            endpoint = self.endpoint(i),
        )
    }

    /// The environment a process needs to use the bucket.
    pub fn credentials_env(&self) -> Vec<(&'static str, &'static str)> {
        vec![("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY)]
    }

    /// Stops node `i` (SIGKILL: a crash, not a shutdown).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` and waits until it answers its CLI.
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("garage log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn garage server");
        node.child = Some(child);
        let ok = super::wait_until(Duration::from_secs(30), || {
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "garage node {i} exited ({status}):\n{}",
                    super::tail_file(&self.nodes[i].log, 4000)
                );
            }
            self.try_cli(i, &["node", "id", "-q"]).is_ok()
        });
        assert!(
            ok,
            "garage node {i} did not answer within 30 s:\n{}",
            super::tail_file(&self.nodes[i].log, 4000)
        );
    }

    /// `<full id>@<address>` of node `i`.
    fn node_id(&self, i: usize) -> String {
        let out = self.cli(i, &["node", "id", "-q"]);
        out.lines()
            .map(str::trim)
            .find(|l| l.contains('@'))
            .unwrap_or_else(|| panic!("garage node id printed no id: {out}"))
            .to_string()
    }

    /// Runs the Garage CLI against node `i`; its stdout, or a panic with
    /// everything it said.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let mut last = String::new();
        // Right after a layout change the cluster may still be converging:
        // a few tries, as an operator would retry.
        for _ in 0..20 {
            match self.try_cli(i, args) {
                Ok(out) => return out,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("garage {args:?} failed: {last}");
    }

    fn try_cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new("timeout")
            .arg("20")
            .arg(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .output()
            .map_err(|e| format!("run garage: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{}\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                super::terminate(&mut child, Duration::from_secs(10));
            }
        }
    }
}
