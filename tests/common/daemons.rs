//! Private container daemons for the client matrix: one containerd and
//! dockerd instances, each with its own root, state and socket under a temp
//! dir, each started inside its own mount namespace (`unshare --mount
//! --propagation private`) so that every mount it makes (overlay snapshots,
//! vfs layers, the bind-mounted /etc/hosts and /etc/docker) vanishes with
//! the process. Nothing on the machine is changed.
//!
//! Both are stopped on Drop (SIGTERM, then SIGKILL after a grace period);
//! hold them in a local of the `#[test]` that runs their cases in sequence,
//! never in a `static` (statics are never dropped, the daemon would outlive
//! the test binary).
//!
//! Also tinyproxy, the egress proxy regmirror's own traffic goes through in
//! the egress and CONNECT passthrough tests.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::clients::{Output, Sandbox, CLIENT_TIMEOUT_SECS};

/// Runs `program args` time-bound, outside any namespace, and captures it.
pub fn run(program: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let out = Command::new("timeout")
        .args(["-k", "10", &CLIENT_TIMEOUT_SECS.to_string(), program])
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    Output {
        cmd: format!("{program} {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Spawns `sh -c SCRIPT` inside a fresh private mount namespace with its
/// output going to `log`. `exec` at the end of the script keeps the
/// daemon's pid the child's pid. The daemon gets SIGTERM if the test thread
/// that started it dies without dropping it (test binary killed).
fn spawn_in_namespace(script: &str, args: &[&Path], env: &[(&str, &OsStr)], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("daemon log");
    Command::new("setpriv")
        .args(["--pdeathsig", "TERM", "--", "unshare"])
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"])
        .args(args)
        .env_remove("SSL_CERT_DIR")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        // After the removals: a daemon told to use a proxy gets it.
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("spawn daemon (unshare)")
}

/// A private containerd (`ctr` talks to it over `sock`).
pub struct Containerd {
    pub sock: PathBuf,
    pub log_path: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// `containerd --config C.toml` with root, state and the gRPC socket
    /// under a temp dir; the CRI plugin is disabled (not needed to pull).
    pub fn start() -> Containerd {
        let dir = super::tempdir("containerd-");
        let d = dir.path();
        let sock = d.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = {sock:?}\n\n[ttrpc]\n  address = {ttrpc:?}\n",
            root = d.join("root").display().to_string(),
            state = d.join("state").display().to_string(),
            sock = sock.display().to_string(),
            ttrpc = d.join("containerd.sock.ttrpc").display().to_string(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).expect("containerd config");
        let log_path = d.join("containerd.log");
        let child = spawn_in_namespace(r#"exec containerd --config "$1""#, &[&config_path], &[], &log_path);
        let mut c = Containerd {
            sock,
            log_path,
            child,
            dir,
        };
        let ok = super::wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!("containerd exited ({status}):\n{}", super::tail_file(&c.log_path, 6000));
            }
            c.sock.exists() && run("ctr", &["--address", &c.sock_str(), "version"], &[]).success()
        });
        assert!(
            ok,
            "private containerd did not answer `ctr version` on {} within 30 s:\n{}",
            c.sock.display(),
            super::tail_file(&c.log_path, 6000)
        );
        c
    }

    pub fn sock_str(&self) -> String {
        self.sock.display().to_string()
    }

    /// `ctr --address SOCK ARGS`, run inside `sb` (ctr resolves and fetches
    /// in the client process, so the sandbox's /etc/hosts and CA apply).
    pub fn ctr(&self, sb: &Sandbox, args: &[&str]) -> Output {
        let sock = self.sock_str();
        let mut all = vec!["ctr", "--address", &sock];
        all.extend_from_slice(args);
        sb.run(&all)
    }

    /// `ctr images pull [--platform P] [--hosts-dir D] REF`; the output and,
    /// on success, the digest `ctr images ls` shows for REF.
    pub fn pull(
        &self,
        sb: &Sandbox,
        reference: &str,
        platform: Option<&str>,
        hosts_dir: Option<&Path>,
    ) -> (Output, Option<String>) {
        let hd = hosts_dir.map(|p| p.display().to_string());
        let mut args = vec!["images", "pull"];
        if let Some(p) = platform {
            args.extend(["--platform", p]);
        }
        if let Some(h) = &hd {
            args.extend(["--hosts-dir", h]);
        }
        args.push(reference);
        let out = self.ctr(sb, &args);
        if !out.success() {
            return (out, None);
        }
        let digest = self.image_digest(sb, reference);
        (out, digest)
    }

    /// `ctr images pull FLAGS REF` (e.g. `--user u:p`, `--plain-http`); the
    /// output and, on success, the digest `ctr images ls` shows for REF.
    pub fn pull_flags(&self, sb: &Sandbox, reference: &str, flags: &[&str]) -> (Output, Option<String>) {
        let mut args = vec!["images", "pull"];
        args.extend_from_slice(flags);
        args.push(reference);
        let out = self.ctr(sb, &args);
        if !out.success() {
            return (out, None);
        }
        let digest = self.image_digest(sb, reference);
        (out, digest)
    }

    /// The DIGEST column of `ctr images ls` for `reference`.
    pub fn image_digest(&self, sb: &Sandbox, reference: &str) -> Option<String> {
        let out = self.ctr(sb, &["images", "ls"]);
        out.stdout.lines().find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&reference)).then(|| cols.get(2).map(|d| d.to_string()))?
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        super::terminate(&mut self.child, Duration::from_secs(15));
        if std::thread::panicking() {
            eprintln!(
                "[harness] containerd log tail:\n{}",
                super::tail_file(&self.log_path, 6000)
            );
        }
        make_removable(self.dir.path());
    }
}

/// A private dockerd; the `docker` CLI talks to it over `sock`.
pub struct Dockerd {
    pub sock: PathBuf,
    pub log_path: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

/// How to start a [`Dockerd`].
pub struct DockerdOpts<'a> {
    /// The daemon's /etc/hosts (bind-mounted over /etc/hosts in its namespace).
    pub hosts: &'a str,
    /// Bind-mounted over /etc/docker: `daemon.json`, `certs.d/`.
    pub etc_docker: &'a Path,
    /// `SSL_CERT_FILE` for the daemon (the roots it trusts for registries).
    pub ssl_cert_file: Option<&'a Path>,
    /// Proxy environment of the daemon (CONNECT mode: what `regmirror setup
    /// docker --connect` puts in its systemd drop-in); empty by default.
    pub proxy_env: &'a [(String, String)],
}

impl Dockerd {
    /// dockerd with vfs storage, no iptables or bridge, data-root, exec-root,
    /// socket and pidfile under a temp dir, inside its own mount namespace
    /// where `opts.hosts` is /etc/hosts and `opts.etc_docker` is /etc/docker.
    pub fn start(opts: DockerdOpts<'_>) -> Dockerd {
        let dir = super::tempdir("dockerd-");
        let d = dir.path();
        let hosts = d.join("hosts");
        std::fs::write(&hosts, opts.hosts).expect("dockerd hosts");
        let sock = d.join("docker.sock");
        let log_path = d.join("dockerd.log");
        let script = r#"mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/docker && exec dockerd \
            --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs \
            --data-root "$3/root" --exec-root "$3/exec" -H "unix://$3/docker.sock" --pidfile "$3/docker.pid""#;
        let mut env: Vec<(&str, &OsStr)> = Vec::new();
        if let Some(ca) = opts.ssl_cert_file {
            env.push(("SSL_CERT_FILE", ca.as_os_str()));
        }
        for (k, v) in opts.proxy_env {
            env.push((k, OsStr::new(v)));
        }
        let child = spawn_in_namespace(script, &[&hosts, opts.etc_docker, d], &env, &log_path);
        let mut dd = Dockerd {
            sock,
            log_path,
            child,
            dir,
        };
        let ok = super::wait_until(Duration::from_secs(60), || {
            if let Ok(Some(status)) = dd.child.try_wait() {
                panic!("dockerd exited ({status}):\n{}", super::tail_file(&dd.log_path, 8000));
            }
            dd.sock.exists() && dd.docker(&["version"]).success()
        });
        assert!(
            ok,
            "private dockerd did not answer `docker version` on {} within 60 s:\n{}",
            dd.sock.display(),
            super::tail_file(&dd.log_path, 8000)
        );
        dd
    }

    /// `docker -H unix://SOCK ARGS` with a private client config dir.
    pub fn docker(&self, args: &[&str]) -> Output {
        let cfg = self.dir.path().join("cli");
        self.docker_as(&cfg, args)
    }

    /// A fresh docker CLI config dir (`DOCKER_CONFIG`, holding `{}`) under
    /// the daemon's temp dir: logins made with it stay in it.
    pub fn cli_config(&self, name: &str) -> PathBuf {
        let cfg = self.dir.path().join(format!("cli-{name}"));
        std::fs::create_dir_all(&cfg).expect("docker config dir");
        std::fs::write(cfg.join("config.json"), "{}").expect("docker config.json");
        cfg
    }

    /// `docker -H unix://SOCK ARGS` with `config` as `DOCKER_CONFIG` (and HOME).
    pub fn docker_as(&self, config: &Path, args: &[&str]) -> Output {
        let host = format!("unix://{}", self.sock.display());
        let mut all = vec!["-H", &host];
        all.extend_from_slice(args);
        run("docker", &all, &[("DOCKER_CONFIG", config), ("HOME", config)])
    }

    /// `docker login [SERVER] -u USER -p PASSWORD` with `config` as the CLI
    /// config (where the credentials are stored on success).
    pub fn login(&self, config: &Path, server: Option<&str>, user: &str, password: &str) -> Output {
        let mut args = vec!["login", "-u", user, "-p", password];
        args.extend(server);
        self.docker_as(config, &args)
    }

    /// `docker pull IMAGE` with `config` as the CLI config; the output and,
    /// on success, the RepoDigests digest of IMAGE's repository.
    pub fn pull_as(&self, config: &Path, image: &str) -> (Output, Option<String>) {
        let out = self.docker_as(config, &["pull", image]);
        if !out.success() {
            return (out, None);
        }
        let digest = self.repo_digest(image);
        (out, digest)
    }

    /// `docker pull [--platform P] IMAGE`; the output and, on success, the
    /// digest of `docker image inspect … RepoDigests` for IMAGE's repository.
    pub fn pull(&self, image: &str, platform: Option<&str>) -> (Output, Option<String>) {
        let mut args = vec!["pull"];
        if let Some(p) = platform {
            args.extend(["--platform", p]);
        }
        args.push(image);
        let out = self.docker(&args);
        if !out.success() {
            return (out, None);
        }
        let digest = self.repo_digest(image);
        (out, digest)
    }

    /// The `sha256:…` of the RepoDigests entry of `image`'s repository.
    pub fn repo_digest(&self, image: &str) -> Option<String> {
        let out = self.inspect(image, "{{json .RepoDigests}}")?;
        let digests: Vec<String> = serde_json::from_str(&out).ok()?;
        // `docker pull x:1` records `x@sha256:…`; the repository is the part before the tag.
        let repo = image
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map_or(image, |(r, _)| r);
        digests
            .iter()
            .find_map(|d| {
                d.split_once('@')
                    .filter(|(r, _)| *r == repo)
                    .map(|(_, d)| d.to_string())
            })
            .or_else(|| {
                digests
                    .first()
                    .and_then(|d| d.split_once('@'))
                    .map(|(_, d)| d.to_string())
            })
    }

    /// `docker image inspect --format FORMAT IMAGE`, trimmed stdout.
    pub fn inspect(&self, image: &str, format: &str) -> Option<String> {
        let out = self.docker(&["image", "inspect", "--format", format, image]);
        out.success().then(|| out.stdout.trim().to_string())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // dockerd stops its managed containerd on SIGTERM; the namespace
        // (and every mount in it) goes away with the last process.
        super::terminate(&mut self.child, Duration::from_secs(20));
        // If dockerd had to be killed, its managed containerd is left behind: stop it by its pidfile.
        let pidfile = self.dir.path().join("exec/containerd/containerd.pid");
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "containerd" {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "[harness] dockerd log tail:\n{}",
                super::tail_file(&self.log_path, 8000)
            );
        }
        make_removable(self.dir.path());
    }
}

/// vfs layers and snapshots may be read-only dirs; let TempDir remove them.
fn make_removable(dir: &Path) {
    let _ = Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// tinyproxy on loopback with a private config; its log names each CONNECT.
pub struct Tinyproxy {
    pub addr: String,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Listens on `listen:port` and tunnels CONNECTs to `connect_ports` only.
    pub fn start(listen: IpAddr, port: u16, connect_ports: &[u16]) -> Tinyproxy {
        let dir = super::tempdir("tinyproxy-");
        let d = dir.path();
        let log = d.join("tinyproxy.log");
        let conf = d.join("tinyproxy.conf");
        let q = |p: &Path| format!("\"{}\"", p.display());
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen {listen}\nTimeout 60\nLogFile {}\nLogLevel Connect\nPidFile {}\nMaxClients 50\nAllow 127.0.0.0/8\n{}",
                q(&log),
                q(&d.join("tinyproxy.pid")),
                connect_ports.iter().map(|p| format!("ConnectPort {p}\n")).collect::<String>()
            ),
        )
        .expect("write tinyproxy config");
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tinyproxy (apt-get install tinyproxy; scripts/test.sh installs it)");
        let addr = format!("{listen}:{port}");
        let up = super::wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(&addr).is_ok());
        assert!(up, "tinyproxy did not listen on {addr}");
        Tinyproxy {
            addr,
            log,
            child,
            _dir: dir,
        }
    }

    /// The CONNECT targets tinyproxy was asked for, in order.
    pub fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("): CONNECT ").map(|(_, t)| t.to_string()))
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
