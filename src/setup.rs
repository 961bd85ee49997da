//! `regmirror setup …`: the client-side configuration for each way of using
//! regmirror, with the proxy's address filled in. The e2e tests write these
//! files and configure the real clients with them, so what is printed here
//! is what is tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Settings;
use crate::tls::CertificateAuthority;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// /etc/hosts lines for transparent mode
    Hosts,
    /// how to trust regmirror's root CA
    Ca,
    /// containerd hosts.toml, one per registry
    Containerd,
    /// podman/skopeo registries.conf mirrors
    Podman,
    /// docker daemon.json (registry-mirrors)
    Docker,
}

/// One file of client configuration: where it goes and what it holds.
#[derive(Debug, Clone)]
pub struct SetupFile {
    pub path: PathBuf,
    pub content: String,
    /// What to run once the file is in place, if anything.
    pub then: Option<&'static str>,
}

#[derive(Debug, Clone, Default)]
pub struct SetupOptions {
    /// Host or IP clients use to reach regmirror; defaults from the config.
    pub proxy: Option<String>,
    /// containerd: mirror over TLS on the proxy's own name instead of plain HTTP.
    pub tls: bool,
    /// CONNECT proxy mode instead of a mirror: the proxy clients put in
    /// `HTTPS_PROXY` (`host`, `host:port` or `http://host:port`); empty
    /// means `server.connect` as configured.
    pub connect: Option<String>,
}

/// What CONNECT-mode clients must not send through regmirror: loopback
/// (a local registry or daemon socket over TCP). Registry names must never
/// be here, or the client bypasses regmirror for them.
const CONNECT_NO_PROXY: &str = "localhost,127.0.0.1,::1";

/// The files for `target`. Paths are where the client reads them on a
/// standard install.
pub fn files(s: &Settings, target: Target, opts: &SetupOptions) -> Result<Vec<SetupFile>, String> {
    if let Some(given) = &opts.connect {
        // `--connect --proxy HOST` reads as `--connect HOST`.
        let given = match (given.trim(), &opts.proxy) {
            ("", Some(p)) => p.as_str(),
            (g, _) => g,
        };
        return connect_files(s, target, given);
    }
    let ca_path = absolute(&CertificateAuthority::cert_path(&s.ca_dir));
    match target {
        Target::Hosts => {
            let ip = match &opts.proxy {
                Some(p) => p.clone(),
                None => listener_ip(s.https).or_else(|| listener_ip(s.http)).ok_or(
                    "the config listens on all addresses; pass --proxy IP (the address clients reach regmirror at)",
                )?,
            };
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(format!("--proxy {ip:?} must be an IP address for /etc/hosts"));
            }
            let names = s.tls_names().join(" ");
            Ok(vec![SetupFile {
                path: "/etc/hosts".into(),
                content: format!("# regmirror: intercept registry hostnames (append to /etc/hosts)\n{ip} {names}\n"),
                then: None,
            }])
        }
        Target::Ca => Ok(vec![ca_file(s)?]),
        Target::Docker => {
            let proxy = plain_proxy(s, opts)?;
            let json = serde_json::json!({
                "registry-mirrors": [format!("http://{proxy}")],
                "insecure-registries": [proxy],
            });
            Ok(vec![SetupFile {
                path: "/etc/docker/daemon.json".into(),
                content: serde_json::to_string_pretty(&json).map_err(|e| e.to_string())? + "\n",
                then: Some("systemctl restart docker"),
            }])
        }
        Target::Containerd => {
            let mirror = if opts.tls {
                let port = s.https.map(|a| a.port()).unwrap_or(443);
                let host = opts.proxy.clone().unwrap_or_else(|| s.server_name.clone());
                if port == 443 {
                    format!("https://{host}")
                } else {
                    format!("https://{host}:{port}")
                }
            } else {
                format!("http://{}", plain_proxy(s, opts)?)
            };
            Ok(s.upstreams
                .iter()
                .map(|u| {
                    let mut content = format!(
                        "# regmirror mirror for {name}\nserver = \"https://{host}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                        name = u.name,
                        host = u.hosts[0],
                    );
                    if opts.tls {
                        content.push_str(&format!("  ca = \"{}\"\n", ca_path.display()));
                    }
                    SetupFile {
                        path: PathBuf::from("/etc/containerd/certs.d").join(&u.name).join("hosts.toml"),
                        content,
                        then: None,
                    }
                })
                .collect())
        }
        Target::Podman => {
            let proxy = plain_proxy(s, opts)?;
            let default = &s.upstreams[s.default_upstream()];
            let mut content = format!(
                "# regmirror mirrors for podman, skopeo and buildah\nunqualified-search-registries = [\"{}\"]\n",
                default.name
            );
            for u in &s.upstreams {
                content.push_str(&format!(
                    "\n[[registry]]\nprefix = \"{name}\"\nlocation = \"{name}\"\n\n[[registry.mirror]]\nlocation = \"{proxy}/{ns}\"\ninsecure = true\n",
                    name = u.name,
                    ns = u.namespace
                ));
            }
            Ok(vec![SetupFile {
                path: "/etc/containers/registries.conf.d/regmirror.conf".into(),
                content,
                then: None,
            }])
        }
    }
}

/// The root itself, ready for the system store (Debian's path; on
/// Fedora/RHEL use /etc/pki/ca-trust/source/anchors/ and update-ca-trust).
/// docker, containerd and podman all verify registries against it.
fn ca_file(s: &Settings) -> Result<SetupFile, String> {
    let ca = CertificateAuthority::load_or_create(&s.ca_dir, &s.tls_names()).map_err(|e| e.to_string())?;
    Ok(SetupFile {
        path: "/usr/local/share/ca-certificates/regmirror.crt".into(),
        content: ca.cert_pem,
        then: Some("update-ca-certificates (then restart dockerd/containerd so they reload trust)"),
    })
}

/// CONNECT proxy mode: the CA, and `HTTPS_PROXY`/`NO_PROXY` where each
/// client reads its environment: a systemd drop-in for the docker and
/// containerd daemons (the daemon pulls, not the CLI), a profile script for
/// podman, skopeo and buildah (each pulls in its own process).
fn connect_files(s: &Settings, target: Target, given: &str) -> Result<Vec<SetupFile>, String> {
    let url = connect_url(s, given)?;
    let dropin = |unit: &str, then: &'static str| SetupFile {
        path: PathBuf::from(format!("/etc/systemd/system/{unit}.service.d/regmirror-proxy.conf")),
        content: format!(
            "# regmirror CONNECT proxy mode: {unit} reaches registries through regmirror\n\
             [Service]\nEnvironment=\"HTTPS_PROXY={url}\"\nEnvironment=\"NO_PROXY={CONNECT_NO_PROXY}\"\n"
        ),
        then: Some(then),
    };
    let env = match target {
        Target::Docker => dropin("docker", "systemctl daemon-reload && systemctl restart docker"),
        Target::Containerd => dropin(
            "containerd",
            "systemctl daemon-reload && systemctl restart containerd (ctr and nerdctl pull in their own process: export the same HTTPS_PROXY and NO_PROXY for them)",
        ),
        Target::Podman => SetupFile {
            path: "/etc/profile.d/regmirror-proxy.sh".into(),
            content: format!(
                "# regmirror CONNECT proxy mode: podman, skopeo and buildah reach registries through regmirror\n\
                 export HTTPS_PROXY={url}\nexport NO_PROXY={CONNECT_NO_PROXY}\n"
            ),
            then: Some("log in again, or: . /etc/profile.d/regmirror-proxy.sh"),
        },
        Target::Hosts | Target::Ca => {
            return Err("--connect applies to docker, containerd and podman (CONNECT mode needs no hosts lines; `setup ca` is the same in every mode)".into())
        }
    };
    Ok(vec![ca_file(s)?, env])
}

/// `http://HOST:PORT` of the CONNECT listener as clients should reach it:
/// from `given` (the port defaulting to `server.connect`'s), or from
/// `server.connect` when it names one address.
fn connect_url(s: &Settings, given: &str) -> Result<String, String> {
    let listener = s
        .connect
        .ok_or("server.connect is not set; CONNECT proxy mode needs the CONNECT listener")?;
    let given = given.trim();
    if given.is_empty() {
        if listener.ip().is_unspecified() {
            return Err("server.connect listens on all addresses; pass --connect HOST[:PORT] (the address clients reach regmirror at)".into());
        }
        return Ok(format!("http://{listener}"));
    }
    let rest = match given.split_once("://") {
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "--connect {given:?}: the CONNECT listener speaks plain HTTP (http://), not {scheme}://"
            ))
        }
        None => given,
    };
    let rest = rest.trim_end_matches('/');
    let parsed = url::Url::parse(&format!("http://{rest}"))
        .ok()
        .filter(|u| u.host_str().is_some() && u.path() == "/" && u.username().is_empty());
    let Some(u) = parsed else {
        return Err(format!("--connect {given:?} is not HOST[:PORT]"));
    };
    let host = u.host_str().unwrap_or_default();
    Ok(format!("http://{host}:{}", u.port().unwrap_or(listener.port())))
}

fn listener_ip(a: Option<SocketAddr>) -> Option<String> {
    a.filter(|a| !a.ip().is_unspecified()).map(|a| a.ip().to_string())
}

/// `HOST:PORT` of the plain listener as clients should address it.
fn plain_proxy(s: &Settings, opts: &SetupOptions) -> Result<String, String> {
    let http = s
        .http
        .ok_or("server.http is not set; mirror setups need the plain listener")?;
    let host = match &opts.proxy {
        Some(p) => p.clone(),
        None => listener_ip(Some(http)).unwrap_or_else(|| s.server_name.clone()),
    };
    if host.contains(':') && !host.starts_with('[') {
        // Already HOST:PORT.
        return Ok(host);
    }
    Ok(format!("{host}:{}", http.port()))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Prints the files, or writes them under `dir` (keeping their paths
/// relative to `/`), for scripts and tests.
pub fn emit(files: &[SetupFile], write_to: Option<&Path>) -> std::io::Result<()> {
    match write_to {
        None => {
            for f in files {
                println!("# ==> {} <==", f.path.display());
                print!("{}", f.content);
                if let Some(then) = f.then {
                    println!("# then run: {then}");
                }
            }
        }
        Some(dir) => {
            for f in files {
                let rel = f.path.strip_prefix("/").unwrap_or(&f.path);
                let dest = dir.join(rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&dest, &f.content)?;
                println!("{}", dest.display());
                if let Some(then) = f.then {
                    eprintln!("then run: {then}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let text = crate::config::DEFAULT_CONFIG.replace("0.0.0.0:5000", "10.1.2.3:5000");
        Settings::from_toml(&text, "t").unwrap()
    }

    #[test]
    fn docker_daemon_json_points_at_the_plain_listener() {
        let f = files(&settings(), Target::Docker, &SetupOptions::default()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&f[0].content).unwrap();
        assert_eq!(v["registry-mirrors"][0], "http://10.1.2.3:5000");
    }

    #[test]
    fn containerd_gets_one_hosts_toml_per_registry() {
        let f = files(
            &settings(),
            Target::Containerd,
            &SetupOptions {
                proxy: Some("mirror".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(f.len(), 3);
        assert!(f[0].path.ends_with("docker.io/hosts.toml"));
        assert!(f[0].content.contains("server = \"https://registry-1.docker.io\""));
        assert!(f[0].content.contains("[host.\"http://mirror:5000\"]"));
        let t = files(
            &settings(),
            Target::Containerd,
            &SetupOptions {
                tls: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(t[1].content.contains("[host.\"https://regmirror.local\"]") && t[1].content.contains("ca = "));
    }

    #[test]
    fn ca_setup_installs_the_root_itself() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            crate::config::DEFAULT_CONFIG.replace("dir = \"certs\"", &format!("dir = \"{}\"", dir.path().display()));
        let s = Settings::from_toml(&text, "t").unwrap();
        let f = files(&s, Target::Ca, &SetupOptions::default()).unwrap();
        assert!(
            f[0].content.starts_with("-----BEGIN CERTIFICATE-----"),
            "{}",
            f[0].content
        );
        assert!(f[0].path.to_str().unwrap().ends_with(".crt"));
        assert!(!f[0].content.contains("PRIVATE"));
    }

    #[test]
    fn hosts_lines_need_an_ip() {
        let s = Settings::load(None).unwrap();
        assert!(files(&s, Target::Hosts, &SetupOptions::default()).is_err());
        let f = files(
            &s,
            Target::Hosts,
            &SetupOptions {
                proxy: Some("192.0.2.7".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(f[0]
            .content
            .contains("192.0.2.7 ghcr.io index.docker.io quay.io registry-1.docker.io regmirror.local"));
    }

    #[test]
    fn podman_mirrors_use_namespace_paths() {
        let f = files(&settings(), Target::Podman, &SetupOptions::default()).unwrap();
        assert!(f[0].content.contains("location = \"10.1.2.3:5000/quay\""));
        assert!(f[0].content.contains("prefix = \"docker.io\""));
    }

    fn connect_settings(listen: &str) -> (tempfile::TempDir, Settings) {
        let dir = tempfile::tempdir().unwrap();
        let text = crate::config::DEFAULT_CONFIG
            .replace("dir = \"certs\"", &format!("dir = \"{}\"", dir.path().display()))
            .replace("[server]\n", &format!("[server]\nconnect = \"{listen}\"\n"));
        (dir, Settings::from_toml(&text, "t").unwrap())
    }

    fn connect(s: &Settings, target: Target, given: &str) -> Result<Vec<SetupFile>, String> {
        files(
            s,
            target,
            &SetupOptions {
                connect: Some(given.into()),
                ..Default::default()
            },
        )
    }

    #[test]
    fn connect_mode_writes_the_ca_and_each_clients_proxy_environment() {
        let (_d, s) = connect_settings("10.1.2.3:3128");
        let f = connect(&s, Target::Docker, "").unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[0].content.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            f[1].path,
            PathBuf::from("/etc/systemd/system/docker.service.d/regmirror-proxy.conf")
        );
        assert!(f[1]
            .content
            .contains("[Service]\nEnvironment=\"HTTPS_PROXY=http://10.1.2.3:3128\"\n"));
        assert!(f[1]
            .content
            .contains("Environment=\"NO_PROXY=localhost,127.0.0.1,::1\"\n"));
        let f = connect(&s, Target::Containerd, "mirror.corp").unwrap();
        assert!(f[1].path.starts_with("/etc/systemd/system/containerd.service.d"));
        assert!(f[1].content.contains("HTTPS_PROXY=http://mirror.corp:3128\""));
        let f = connect(&s, Target::Podman, "http://mirror.corp:8080/").unwrap();
        assert_eq!(f[1].path, PathBuf::from("/etc/profile.d/regmirror-proxy.sh"));
        assert!(f[1].content.contains("\nexport HTTPS_PROXY=http://mirror.corp:8080\n"));
        assert!(f[1].content.contains("\nexport NO_PROXY=localhost,127.0.0.1,::1\n"));
        let f = connect(&s, Target::Podman, "[fd00::7]:3129").unwrap();
        assert!(f[1].content.contains("HTTPS_PROXY=http://[fd00::7]:3129\n"));
    }

    #[test]
    fn connect_mode_refuses_what_cannot_work() {
        let (_d, s) = connect_settings("0.0.0.0:3128");
        let e = connect(&s, Target::Docker, "").unwrap_err();
        assert!(e.contains("all addresses"), "{e}");
        for bad in [
            "https://mirror:3128",
            "user:pw@mirror",
            "mirror/path",
            "socks5://mirror",
        ] {
            assert!(connect(&s, Target::Docker, bad).is_err(), "{bad}");
        }
        assert!(connect(&s, Target::Hosts, "mirror").is_err());
        assert!(connect(&s, Target::Ca, "mirror").is_err());
        let e = connect(&settings(), Target::Docker, "mirror").unwrap_err();
        assert!(e.contains("server.connect is not set"), "{e}");
    }
}
