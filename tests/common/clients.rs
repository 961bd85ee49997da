//! Real clients (skopeo, podman) run in a private mount namespace whose
//! /etc/hosts maps registry hostnames to one address, trusting one CA via
//! `SSL_CERT_FILE`. Nothing on the machine is changed; each [`Sandbox`] has
//! its own hosts file, containers config, storage and auth file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Seconds any single client command may run.
pub const CLIENT_TIMEOUT_SECS: u32 = 120;

/// The result of one client command.
#[derive(Debug, Clone)]
pub struct Output {
    pub cmd: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Panics with the command's output unless it exited 0.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.success(),
            "`{}` failed (exit {:?}{})\nstdout:\n{}\nstderr:\n{}",
            self.cmd,
            self.code,
            if self.code == Some(124) { ", timed out" } else { "" },
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A client environment: private /etc/hosts, CA, containers config and storage.
pub struct Sandbox {
    pub ip: IpAddr,
    pub hostnames: Vec<String>,
    pub ca_pem: PathBuf,
    dir: tempfile::TempDir,
    counter: std::sync::atomic::AtomicUsize,
    /// Proxy environment for the clients (CONNECT mode: `HTTPS_PROXY`,
    /// `NO_PROXY`); none by default.
    proxy_env: Vec<(String, String)>,
}

impl Sandbox {
    /// A CONNECT-mode client: an /etc/hosts with localhost only (registry
    /// names do not resolve at all in the sandbox), `proxy_env` (what
    /// `regmirror setup podman --connect` exports) and `ca_pem` trusted.
    pub fn behind_proxy(proxy_env: &[(String, String)], ca_pem: &Path) -> Sandbox {
        let mut sb = Sandbox::new(IpAddr::from([127, 0, 0, 1]), &[], ca_pem);
        sb.set_hosts("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
        sb.proxy_env = proxy_env.to_vec();
        sb
    }

    /// Maps every name in `hostnames` to `ip`; clients trust only `ca_pem`.
    pub fn new(ip: IpAddr, hostnames: &[String], ca_pem: &Path) -> Sandbox {
        let dir = super::tempdir("client-");
        let d = dir.path();
        let hosts = format!(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{ip} {}\n",
            hostnames.join(" ")
        );
        std::fs::write(d.join("hosts"), hosts).expect("hosts");
        std::fs::write(
            d.join("registries.conf"),
            "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n",
        )
        .expect("registries.conf");
        for sub in ["root", "runroot", "tmp", "home", "run", "out"] {
            std::fs::create_dir_all(d.join(sub)).expect("sandbox dir");
        }
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                d.join("runroot").display(),
                d.join("root").display()
            ),
        )
        .expect("storage.conf");
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\ntmp_dir = \"{}\"\nimage_copy_tmp_dir = \"{}\"\n",
                d.join("events.log").display(),
                d.join("run").display(),
                d.join("tmp").display()
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("policy.json");
        std::fs::write(d.join("auth.json"), "{\"auths\":{}}").expect("auth.json");
        Sandbox {
            ip,
            hostnames: hostnames.to_vec(),
            ca_pem: ca_pem.to_path_buf(),
            dir,
            counter: Default::default(),
            proxy_env: Vec::new(),
        }
    }

    /// Names for the registry hostnames the standard upstreams use, plus `extra`.
    pub fn standard_hostnames(extra: &[&str]) -> Vec<String> {
        [
            "registry-1.docker.io",
            "docker.io",
            "index.docker.io",
            "ghcr.io",
            "quay.io",
        ]
        .iter()
        .chain(extra.iter())
        .map(|s| s.to_string())
        .collect()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the sandbox's /etc/hosts (e.g. with `regmirror setup hosts` output).
    pub fn set_hosts(&self, content: &str) {
        std::fs::write(self.dir.path().join("hosts"), content).expect("write sandbox hosts");
    }

    /// Replaces the registries.conf podman and skopeo read, e.g. with
    /// `regmirror setup podman` output: podman's `CONTAINERS_REGISTRIES_CONF`
    /// and the per-user `$HOME/.config/containers/registries.conf` (skopeo
    /// does not read that variable).
    pub fn set_registries_conf(&self, content: &str) {
        let d = self.dir.path();
        std::fs::write(d.join("registries.conf"), content).expect("write registries.conf");
        let user = d.join("home/.config/containers");
        std::fs::create_dir_all(&user).expect("user containers dir");
        std::fs::write(user.join("registries.conf"), content).expect("write user registries.conf");
    }

    /// Runs `args` (program first) inside the namespace, time-bound.
    pub fn run(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "10", &CLIENT_TIMEOUT_SECS.to_string()])
            .args(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"h="$1"; shift; mount --bind "$h" /etc/hosts && exec "$@""#)
            .arg("sh")
            .arg(d.join("hosts"))
            .args(args)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .env_remove("SSL_CERT_DIR")
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("HOME", d.join("home"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .env("TMPDIR", d.join("tmp"))
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .stdin(Stdio::null());
        cmd.envs(self.proxy_env.iter().map(|(k, v)| (k, v)));
        let out = cmd.output().expect("run client command");
        Output {
            cmd: args.join(" "),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn next_out_dir(&self, prefix: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.dir.path().join("out").join(format!("{prefix}-{n}"))
    }

    fn policy(&self) -> String {
        self.dir.path().join("policy.json").display().to_string()
    }

    /// `skopeo copy [--override-arch ARCH] docker://IMAGE dir:OUT`; returns the
    /// output and, on success, the sha256 digest of `OUT/manifest.json`.
    pub fn skopeo_copy(&self, image: &str, arch: Option<&str>) -> (Output, Option<String>) {
        self.skopeo_copy_opts(image, arch, &[])
    }

    /// [`Sandbox::skopeo_copy`] with extra `copy` flags (e.g. `--src-tls-verify=false`).
    pub fn skopeo_copy_opts(&self, image: &str, arch: Option<&str>, flags: &[&str]) -> (Output, Option<String>) {
        let out_dir = self.next_out_dir("skopeo");
        let policy = self.policy();
        let src = format!("docker://{image}");
        let dst = format!("dir:{}", out_dir.display());
        let mut args = vec!["skopeo", "--policy", &policy];
        if let Some(a) = arch {
            args.extend(["--override-arch", a, "--override-os", "linux"]);
        }
        args.extend(["copy", "--retry-times", "0"]);
        args.extend_from_slice(flags);
        args.extend([src.as_str(), dst.as_str()]);
        let out = self.run(&args);
        let digest = out
            .success()
            .then(|| std::fs::read(out_dir.join("manifest.json")).ok())
            .flatten()
            .map(|m| super::sha256_digest(&m));
        (out, digest)
    }

    /// `skopeo inspect --raw docker://IMAGE`; stdout is the manifest bytes.
    pub fn skopeo_inspect_raw(&self, image: &str) -> Output {
        let policy = self.policy();
        let src = format!("docker://{image}");
        self.run(&[
            "skopeo",
            "--policy",
            &policy,
            "inspect",
            "--raw",
            "--retry-times",
            "0",
            &src,
        ])
    }

    /// Digest of the manifest a tag points to, as skopeo sees it.
    pub fn skopeo_digest(&self, image: &str) -> Option<String> {
        let out = self.skopeo_inspect_raw(image);
        out.success().then(|| super::sha256_digest(out.stdout.as_bytes()))
    }

    fn podman_args(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            "podman".into(),
            "--root".into(),
            d.join("root").display().to_string(),
            "--runroot".into(),
            d.join("runroot").display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--events-backend".into(),
            "file".into(),
            "--tmpdir".into(),
            d.join("run").display().to_string(),
        ]
    }

    /// `podman pull [--arch ARCH] IMAGE`; returns the output and, on success,
    /// `podman image inspect --format {{.Digest}}`.
    pub fn podman_pull(&self, image: &str, arch: Option<&str>) -> (Output, Option<String>) {
        self.podman_pull_opts(image, arch, &[])
    }

    /// [`Sandbox::podman_pull`] with extra `pull` flags (e.g. `--tls-verify=false`).
    pub fn podman_pull_opts(&self, image: &str, arch: Option<&str>, flags: &[&str]) -> (Output, Option<String>) {
        let mut args = self.podman_args();
        args.extend(["pull".into(), "--signature-policy".into(), self.policy()]);
        args.extend(flags.iter().map(|f| f.to_string()));
        if let Some(a) = arch {
            args.extend(["--arch".into(), a.into(), "--os".into(), "linux".into()]);
        }
        args.push(image.into());
        let out = self.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        if !out.success() {
            return (out, None);
        }
        let digest = self.podman_digest(image);
        (out, digest)
    }

    /// `podman image inspect --format {{.Digest}} IMAGE`. For a pull of one
    /// platform from an index, podman 4.3 reports the *index* digest here.
    pub fn podman_digest(&self, image: &str) -> Option<String> {
        self.podman_inspect(image, "{{.Digest}}")
    }

    /// `podman image inspect --format FORMAT IMAGE`, trimmed stdout.
    pub fn podman_inspect(&self, image: &str, format: &str) -> Option<String> {
        let out = self.podman(&["image", "inspect", "--format", format, image]);
        out.success().then(|| out.stdout.trim().to_string())
    }

    /// Runs any podman subcommand with this sandbox's storage flags.
    pub fn podman(&self, sub: &[&str]) -> Output {
        let mut args = self.podman_args();
        args.extend(sub.iter().map(|s| s.to_string()));
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // vfs layers may be read-only; make sure TempDir can remove them.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
