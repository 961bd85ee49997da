//! Spawns the regmirror binary under test with a generated config and stops
//! it (SIGTERM, then SIGKILL) on Drop.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One `[[upstream]]` entry.
#[derive(Clone, Debug)]
pub struct UpstreamEntry {
    pub name: String,
    pub hosts: Vec<String>,
    pub url: String,
    pub namespace: String,
    pub ca_file: Option<PathBuf>,
    /// `(username, password)`; the password is written to a file.
    pub credentials: Option<(String, String)>,
    /// When not empty, rendered as `urls = [...]` instead of `url`.
    pub urls: Vec<String>,
    /// Raw TOML lines added to the entry (`retries = 0`).
    pub extra: String,
}

impl UpstreamEntry {
    pub fn new(name: &str, hosts: &[&str], url: &str, namespace: &str) -> UpstreamEntry {
        UpstreamEntry {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            url: url.into(),
            namespace: namespace.into(),
            ca_file: None,
            credentials: None,
            urls: Vec::new(),
            extra: String::new(),
        }
    }
    /// Several URLs, tried in order (replaces `url`).
    pub fn urls(mut self, urls: &[&str]) -> Self {
        self.urls = urls.iter().map(|u| u.to_string()).collect();
        self
    }
    pub fn extra(mut self, toml_lines: &str) -> Self {
        self.extra = format!("{toml_lines}\n");
        self
    }
    pub fn ca_file(mut self, path: &Path) -> Self {
        self.ca_file = Some(path.to_path_buf());
        self
    }
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }
}

/// regmirror's config, built in code and rendered to TOML.
#[derive(Clone, Debug)]
pub struct Config {
    pub https: SocketAddr,
    pub http: SocketAddr,
    /// `server.connect`, the CONNECT proxy listener (see [`Config::with_connect`]).
    pub connect: Option<SocketAddr>,
    pub name: String,
    pub max_size: String,
    /// `[resolver] overrides`: host name → IP.
    pub overrides: Vec<(String, IpAddr)>,
    pub upstreams: Vec<UpstreamEntry>,
    /// Raw TOML appended verbatim (for keys this builder doesn't know yet).
    pub extra_toml: String,
    /// Extra environment for the regmirror process (e.g. `HTTPS_PROXY`).
    pub env: Vec<(String, String)>,
    /// Run regmirror in its own mount namespace with these `/etc/hosts` and
    /// `/etc/resolv.conf` contents (to prove what it does and does not read).
    pub private_etc: Option<(String, String)>,
    /// Run with `--log-format json` (one JSON object per log line).
    pub log_json: bool,
    /// Lines added to `[cache]` (e.g. the S3 backend's keys).
    pub cache_extra: String,
    /// A CA directory to use instead of a fresh one (replicas share one).
    pub ca_dir: Option<PathBuf>,
}

/// Hostnames of the three standard upstreams.
pub const DOCKER_HOSTS: &[&str] = &["registry-1.docker.io", "docker.io", "index.docker.io"];
pub const GHCR_HOSTS: &[&str] = &["ghcr.io"];
pub const QUAY_HOSTS: &[&str] = &["quay.io"];

impl Config {
    /// Listeners on `ip:443` and `ip:5000`, name `regmirror.test`, no upstreams.
    pub fn new(ip: IpAddr) -> Config {
        Config {
            https: SocketAddr::new(ip, 443),
            http: SocketAddr::new(ip, 5000),
            connect: None,
            name: "regmirror.test".into(),
            max_size: "1GiB".into(),
            overrides: Vec::new(),
            upstreams: Vec::new(),
            extra_toml: String::new(),
            env: Vec::new(),
            private_etc: None,
            log_json: false,
            cache_extra: String::new(),
            ca_dir: None,
        }
    }

    /// docker.io, ghcr.io and quay.io all served by `url` (e.g.
    /// `https://upstream.test`), trusting `ca_file`, with `upstream.test`
    /// resolved to `upstream_ip`.
    pub fn with_standard_upstreams(mut self, upstream_host: &str, upstream_ip: IpAddr, ca_file: &Path) -> Config {
        self.overrides.push((upstream_host.into(), upstream_ip));
        let url = format!("https://{upstream_host}");
        self.upstreams
            .push(UpstreamEntry::new("docker.io", DOCKER_HOSTS, &url, "dockerhub").ca_file(ca_file));
        self.upstreams
            .push(UpstreamEntry::new("ghcr.io", GHCR_HOSTS, &url, "ghcr").ca_file(ca_file));
        self.upstreams
            .push(UpstreamEntry::new("quay.io", QUAY_HOSTS, &url, "quay").ca_file(ca_file));
        self
    }

    /// Adds the CONNECT proxy listener on `ip:3128` (the listeners' address).
    pub fn with_connect(mut self) -> Config {
        self.connect = Some(SocketAddr::new(self.https.ip(), 3128));
        self
    }

    /// Sets credentials on the upstream called `name`.
    pub fn with_credentials(mut self, name: &str, user: &str, password: &str) -> Config {
        let up = self
            .upstreams
            .iter_mut()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("no upstream {name}"));
        up.credentials = Some((user.into(), password.into()));
        self
    }

    pub fn with_upstream(mut self, entry: UpstreamEntry) -> Config {
        self.upstreams.push(entry);
        self
    }

    pub fn with_override(mut self, host: &str, ip: IpAddr) -> Config {
        self.overrides.push((host.into(), ip));
        self
    }

    /// All hostnames a client should map to the proxy (upstream hosts and the proxy's name).
    pub fn client_hostnames(&self) -> Vec<String> {
        let mut names: Vec<String> = self.upstreams.iter().flat_map(|u| u.hosts.clone()).collect();
        names.push(self.name.clone());
        names.dedup();
        names
    }

    /// Renders the TOML; password files are written under `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let p = |p: &Path| q(&p.display().to_string());
        let mut t = String::new();
        t += &format!(
            "[server]\nhttps = {}\nhttp = {}\nname = {}\n\n",
            q(&self.https.to_string()),
            q(&self.http.to_string()),
            q(&self.name)
        );
        if let Some(c) = self.connect {
            t = t.replacen("[server]\n", &format!("[server]\nconnect = {}\n", q(&c.to_string())), 1);
        }
        t += &format!(
            "[ca]\ndir = {}\n\n",
            p(&self.ca_dir.clone().unwrap_or_else(|| dir.join("certs")))
        );
        t += &format!(
            "[cache]\ndir = {}\nmax_size = {}\n{}\n",
            p(&dir.join("data")),
            q(&self.max_size),
            self.cache_extra
        );
        if !self.overrides.is_empty() {
            let items: Vec<String> = self
                .overrides
                .iter()
                .map(|(h, ip)| format!("{} = {}", q(h), q(&ip.to_string())))
                .collect();
            t += &format!("[resolver]\noverrides = {{ {} }}\n\n", items.join(", "));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let hosts: Vec<String> = u.hosts.iter().map(|h| q(h)).collect();
            let location = if u.urls.is_empty() {
                format!("url = {}", q(&u.url))
            } else {
                let urls: Vec<String> = u.urls.iter().map(|x| q(x)).collect();
                format!("urls = [{}]", urls.join(", "))
            };
            t += &format!(
                "[[upstream]]\nname = {}\nhosts = [{}]\n{location}\nnamespace = {}\n",
                q(&u.name),
                hosts.join(", "),
                q(&u.namespace),
            );
            if let Some(ca) = &u.ca_file {
                t += &format!("ca_file = {}\n", p(ca));
            }
            if let Some((user, password)) = &u.credentials {
                let pw = dir.join(format!("password-{i}"));
                std::fs::write(&pw, password).expect("write password file");
                t += &format!("username = {}\npassword_file = {}\n", q(user), p(&pw));
            }
            // Last: it may open sub-tables (`[[upstream.tag_policy]]`).
            t += &u.extra;
            t += "\n";
        }
        t += &self.extra_toml;
        t
    }
}

/// The binary under test: `REGMIRROR_BIN` if set (e.g. a release build),
/// else the one cargo built for this test run.
pub fn binary() -> PathBuf {
    std::env::var_os("REGMIRROR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_regmirror")))
}

/// A running regmirror.
pub struct Regmirror {
    pub config: Config,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// `<ca.dir>/ca.pem`, the root clients must trust.
    pub ca_pem: PathBuf,
    pub cache_dir: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl Regmirror {
    /// Writes the config, starts `regmirror serve --config`, waits for the
    /// plain listener to answer `GET /v2/` and for `ca.pem` to exist.
    pub fn start(config: Config) -> Regmirror {
        let dir = super::tempdir("regmirror-");
        let toml = config.render(dir.path());
        let config_path = dir.path().join("regmirror.toml");
        std::fs::write(&config_path, &toml).expect("write config");
        let log_path = dir.path().join("regmirror.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = match &config.private_etc {
            None => {
                let mut c = Command::new(binary());
                c.args(["serve", "--config"]).arg(&config_path);
                if config.log_json {
                    c.args(["--log-format", "json"]);
                }
                c
            }
            Some((hosts, resolv)) => {
                let hosts_path = dir.path().join("etc-hosts");
                let resolv_path = dir.path().join("etc-resolv.conf");
                std::fs::write(&hosts_path, hosts).expect("write private hosts");
                std::fs::write(&resolv_path, resolv).expect("write private resolv.conf");
                let script = format!(
                    "mount --bind '{}' /etc/hosts && mount --bind '{}' /etc/resolv.conf && exec '{}' serve --config '{}'{}",
                    hosts_path.display(),
                    resolv_path.display(),
                    binary().display(),
                    config_path.display(),
                    if config.log_json { " --log-format json" } else { "" }
                );
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "--", "sh", "-c", &script]);
                c
            }
        };
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "regmirror=debug".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .envs(config.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn regmirror");
        let mut rm = Regmirror {
            ca_pem: config
                .ca_dir
                .clone()
                .unwrap_or_else(|| dir.path().join("certs"))
                .join("ca.pem"),
            cache_dir: dir.path().join("data"),
            config,
            config_path,
            log_path,
            child,
            dir,
        };
        rm.wait_ready();
        rm
    }

    fn wait_ready(&mut self) {
        // Regmirror's own readiness; `/v2/` may wait on upstream.
        let url = format!("http://{}/healthz", self.config.http);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let ok = super::wait_until(Duration::from_secs(15), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "regmirror exited during start-up ({status}); config:\n{}\nlog:\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.log()
                );
            }
            self.ca_pem.exists()
                && super::block_on(async { client.get(&url).send().await }).is_ok()
                && std::net::TcpStream::connect_timeout(&self.config.https, Duration::from_secs(1)).is_ok()
        });
        assert!(
            ok,
            "regmirror not ready within 15 s ({url}, {}); config:\n{}\nlog:\n{}",
            self.ca_pem.display(),
            std::fs::read_to_string(&self.config_path).unwrap_or_default(),
            self.log()
        );
    }

    pub fn ip(&self) -> IpAddr {
        self.config.https.ip()
    }

    /// The regmirror process (`unshare` and `sh` exec into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `VmRSS` and `VmHWM` (peak) of the process, KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// `http://IP:5000`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.config.http)
    }

    /// `http://IP:3128`, what CONNECT-mode clients put in `HTTPS_PROXY`.
    pub fn connect_url(&self) -> String {
        format!(
            "http://{}",
            self.config.connect.expect("regmirror started without with_connect()")
        )
    }

    /// The `/metrics` text of the plain listener.
    pub fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.http_url());
        super::block_on(async { reqwest::get(&url).await?.text().await }).expect("GET /metrics")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `regmirror setup TARGET --config CFG ARGS --write DIR` with this
    /// instance's config and returns the files it wrote (it prints one path
    /// per line). Panics if the command fails.
    pub fn setup(&self, target: &str, args: &[&str], dir: &Path) -> Vec<PathBuf> {
        let out = Command::new(binary())
            .args(["setup", target, "--config"])
            .arg(&self.config_path)
            .args(args)
            .arg("--write")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run regmirror setup");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "regmirror setup {target} {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(PathBuf::from)
            .collect()
    }

    /// Stops the process (SIGTERM, 10 s grace) and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        super::terminate(&mut self.child, Duration::from_secs(10));
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Regmirror {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "[harness] regmirror {} log tail:\n{}",
                self.config.https,
                super::tail_file(&self.log_path, 12000)
            );
        }
    }
}
