//! Shared pieces of the client × mode matrix (`e2e_docker`, `e2e_containerd`,
//! `e2e_podman_skopeo`): one upstream + regmirror per test, client sandboxes
//! configured from `regmirror setup …` output, and the assertions every cell
//! makes (digest, cold = each blob once, warm = no content GET, one platform
//! = nothing of the other, errors = the registry's OCI text).

use std::net::IpAddr;
use std::path::PathBuf;

use super::clients::{Output, Sandbox};
use super::images::{self, Format, Image, MultiImage};
use super::regmirror::{Config, Regmirror};
use super::upstream::{blob_fetch_counts, AccessEntry, Upstream};
use super::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};

const KIB: usize = 1024;

/// Where nothing listens: registry names point here when only a mirror may answer.
pub const DEAD_IP: &str = "127.0.0.9";

/// regmirror (declared first, so it stops first) in front of distribution
/// with token auth; docker.io, ghcr.io and quay.io all map to it.
pub struct Stack {
    pub rm: Regmirror,
    pub env: UpstreamEnv,
    dir: tempfile::TempDir,
}

impl Stack {
    pub fn start() -> Stack {
        Stack::start_with(UpstreamEnvOpts::default(), |cfg| cfg)
    }

    /// [`Stack::start`] with other upstream options (e.g. a token policy
    /// with private repositories) and a changed regmirror config.
    pub fn start_with(opts: UpstreamEnvOpts, configure: impl FnOnce(Config) -> Config) -> Stack {
        let env = UpstreamEnv::start(opts);
        let cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
        let rm = Regmirror::start(configure(cfg));
        Stack {
            rm,
            env,
            dir: super::tempdir("matrix-"),
        }
    }

    pub fn up(&self) -> &Upstream {
        &self.env.upstream
    }

    pub fn proxy_ip(&self) -> IpAddr {
        self.rm.ip()
    }

    /// `PROXY:5000`, the plain listener.
    pub fn plain(&self) -> String {
        self.rm.config.http.to_string()
    }

    /// regmirror's own name (`server.name`).
    pub fn name(&self) -> &str {
        &self.rm.config.name
    }

    /// Runs `regmirror setup TARGET ARGS --write DIR` into a fresh dir under
    /// the stack's temp dir and returns the one file it wrote with that name.
    pub fn setup_file(&self, target: &str, args: &[&str], file_name: &str) -> PathBuf {
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        let dir = self.dir.path().join(format!("setup-{target}-{n}"));
        let written = self.rm.setup(target, args, &dir);
        written
            .into_iter()
            .find(|p| p.file_name().is_some_and(|f| f == file_name))
            .unwrap_or_else(|| panic!("regmirror setup {target} wrote no {file_name}"))
    }

    /// The dir `regmirror setup containerd ARGS --write DIR` wrote
    /// (`DIR/etc/containerd/certs.d`, one `<registry>/hosts.toml` each).
    pub fn containerd_hosts_dir(&self, args: &[&str]) -> PathBuf {
        let file = self.setup_file("containerd", args, "hosts.toml");
        let certs_d = file.parent().and_then(|p| p.parent()).expect("certs.d").to_path_buf();
        for reg in ["docker.io", "ghcr.io", "quay.io"] {
            assert!(
                certs_d.join(reg).join("hosts.toml").exists(),
                "setup containerd wrote no {reg}/hosts.toml"
            );
        }
        certs_d
    }

    /// The /etc/hosts of a transparent-mode client: localhost plus exactly
    /// what `regmirror setup hosts --proxy PROXY` wrote.
    pub fn transparent_hosts(&self) -> String {
        let file = self.setup_file("hosts", &["--proxy", &self.proxy_ip().to_string()], "hosts");
        let lines = std::fs::read_to_string(&file).expect("read setup hosts");
        format!("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{lines}")
    }

    /// A transparent-mode client: setup's hosts file, regmirror's CA.
    pub fn client(&self) -> Sandbox {
        let sb = Sandbox::new(self.proxy_ip(), &self.rm.config.client_hostnames(), &self.rm.ca_pem);
        sb.set_hosts(&self.transparent_hosts());
        sb
    }

    /// A CONNECT-mode client: no registry name in its /etc/hosts at all, and
    /// exactly what `regmirror setup podman --connect PROXY` wrote: its
    /// `HTTPS_PROXY`/`NO_PROXY` exports and the CA file.
    pub fn connect_client(&self) -> Sandbox {
        let (env, ca) = self.connect_setup("podman");
        Sandbox::behind_proxy(&env, &ca)
    }

    /// `regmirror setup TARGET --connect PROXY` (PROXY: the CONNECT
    /// listener): the proxy environment its drop-in or profile script sets,
    /// and the CA file it wrote.
    pub fn connect_setup(&self, target: &str) -> (Vec<(String, String)>, PathBuf) {
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        let dir = self.dir.path().join(format!("setup-{target}-connect-{n}"));
        let written = self.rm.setup(target, &["--connect", &self.rm.connect_url()], &dir);
        let named = |name: &str| written.iter().find(|p| p.file_name().is_some_and(|f| f == name));
        let ca = named("regmirror.crt")
            .unwrap_or_else(|| panic!("setup {target} --connect wrote no CA: {written:?}"))
            .clone();
        let env_file = named("regmirror-proxy.conf")
            .or_else(|| named("regmirror-proxy.sh"))
            .unwrap_or_else(|| panic!("setup {target} --connect wrote no proxy environment: {written:?}"));
        let text = std::fs::read_to_string(env_file).expect("read setup's proxy environment");
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| {
                let assignment = l
                    .strip_prefix("Environment=\"")
                    .and_then(|a| a.strip_suffix('"'))
                    .or_else(|| l.strip_prefix("export "))?;
                let (k, v) = assignment.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        assert!(
            env.iter().any(|(k, _)| k == "HTTPS_PROXY"),
            "setup {target} --connect set no HTTPS_PROXY:\n{text}"
        );
        (env, ca)
    }

    /// The /etc/hosts of a mirror-mode client: every registry name at
    /// [`DEAD_IP`] (so no fallback to the real registry can hide a broken
    /// mirror); with `own_name`, regmirror's `server.name` at the proxy.
    pub fn dead_registries_hosts(&self, own_name: bool) -> String {
        let mut h = format!(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{DEAD_IP} {}\n",
            Sandbox::standard_hostnames(&[]).join(" ")
        );
        if own_name {
            h += &format!("{} {}\n", self.proxy_ip(), self.name());
        }
        h
    }

    /// A mirror-mode client (see [`Stack::dead_registries_hosts`]) trusting `ca`.
    pub fn mirror_client(&self, own_name: bool, ca: &std::path::Path) -> Sandbox {
        let sb = Sandbox::new(DEAD_IP.parse().expect("ip"), &Sandbox::standard_hostnames(&[]), ca);
        sb.set_hosts(&self.dead_registries_hosts(own_name));
        sb
    }

    /// Pushes a fresh single-platform image (unique random content) to `repo:1`.
    pub fn image(&self, repo: &str, format: Format) -> Image {
        let img = images::build_image(format, "amd64", &[96 * KIB, 160 * KIB]);
        self.env.pusher.push_image(repo, "1", &img);
        img
    }

    /// For each `(name, repo, format)`: pushes a fresh image to `repo:1`,
    /// pulls `name` cold with `cold` (every blob upstream once), then warm
    /// with `warm` (one tag `HEAD` upstream).
    pub fn cold_then_warm_each(
        &self,
        images: &[(&str, &str, Format)],
        cold: impl Fn(&str) -> (Output, Option<String>),
        warm: impl Fn(&str) -> (Output, Option<String>),
    ) {
        for (name, repo, format) in images {
            let img = self.image(repo, *format);
            cold_then_warm(self.up(), name, repo, &img, || cold(name), || warm(name));
        }
    }

    /// Pushes a fresh amd64 + arm64 index to `repo:1`.
    pub fn index(&self, repo: &str, format: Format) -> MultiImage {
        let idx = images::build_index(format, &["amd64", "arm64"], &[96 * KIB, 128 * KIB]);
        self.env.pusher.push_index(repo, "1", &idx);
        idx
    }
}

/// Asserts a pull succeeded and reported `want`.
#[track_caller]
pub fn assert_pulled(what: &str, (out, digest): &(Output, Option<String>), want: &str) {
    out.assert_ok();
    assert_eq!(
        digest.as_deref(),
        Some(want),
        "{what}: digest the client reports vs upstream's\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// Cold: every blob of `image` reached upstream exactly once since `mark`.
#[track_caller]
pub fn assert_cold(up: &Upstream, mark: usize, image: &Image, what: &str) -> Vec<AccessEntry> {
    let entries = up.entries_since(mark);
    let counts = blob_fetch_counts(&entries);
    for d in image.blob_digests() {
        assert_eq!(
            counts.get(&d).copied(),
            Some(1),
            "{what}: upstream GETs of blob {d}: {}",
            summarize(&entries)
        );
    }
    entries
}

/// Warm: since `mark` upstream saw no blob request and no manifest request
/// other than a HEAD of a tag of `repo` (tags are mutable: regmirror asks).
#[track_caller]
pub fn assert_warm(up: &Upstream, mark: usize, repo: &str, what: &str) -> Vec<AccessEntry> {
    let entries = up.entries_since(mark);
    let content: Vec<&AccessEntry> = entries
        .iter()
        .filter(|e| {
            e.blob_digest().is_some()
                || (e.manifest_ref().is_some() && (e.method != "HEAD" || e.manifest_ref().is_some_and(is_digest)))
        })
        .collect();
    assert!(
        content.is_empty(),
        "{what}: warm pull reached upstream for content: {content:#?}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e.method == "HEAD" && e.repo() == Some(repo) && e.manifest_ref().is_some()),
        "{what}: no HEAD of the tag of {repo} reached upstream: {entries:#?}"
    );
    entries
}

fn is_digest(r: &str) -> bool {
    r.starts_with("sha256:")
}

/// One platform: no blob or manifest of `other` was requested since `mark`,
/// and every blob of `wanted` was fetched once.
#[track_caller]
pub fn assert_one_platform(up: &Upstream, mark: usize, wanted: &Image, other: &Image, what: &str) {
    let entries = assert_cold(up, mark, wanted, what);
    let blobs = other.blob_digests();
    let hit: Vec<&AccessEntry> = entries
        .iter()
        .filter(|e| {
            e.blob_digest().is_some_and(|d| blobs.iter().any(|b| b == d))
                || e.manifest_ref() == Some(other.manifest_digest.as_str())
        })
        .collect();
    assert!(
        hit.is_empty(),
        "{what}: {}/{} content was fetched: {hit:#?}",
        other.os,
        other.arch
    );
}

/// A failed pull whose output carries the registry's OCI error text and
/// nothing that points at regmirror's TLS or a broken response.
#[track_caller]
pub fn assert_registry_error(out: &Output, text: &str) {
    assert!(!out.success(), "`{}` succeeded but should have failed", out.cmd);
    let all = format!("{}\n{}", out.stdout, out.stderr);
    assert!(
        all.contains(text),
        "`{}`: expected {text:?} in the client's output:\n{all}",
        out.cmd
    );
    for bad in ["x509", "certificate", "tls: ", "malformed", "unexpected EOF"] {
        assert!(!all.contains(bad), "`{}`: error mentions {bad:?}:\n{all}", out.cmd);
    }
}

/// A cold pull by one client, then a warm pull of the same image by another:
/// both report upstream's digest, the cold pull fetched every blob once, the
/// warm one cost upstream only a HEAD of the tag.
pub fn cold_then_warm(
    up: &Upstream,
    name: &str,
    repo: &str,
    image: &Image,
    cold: impl FnOnce() -> (Output, Option<String>),
    warm: impl FnOnce() -> (Output, Option<String>),
) {
    let mark = up.mark();
    assert_pulled(name, &cold(), &image.manifest_digest);
    assert_cold(up, mark, image, name);
    let mark = up.mark();
    assert_pulled(name, &warm(), &image.manifest_digest);
    assert_warm(up, mark, repo, name);
}

/// "GET blobs 200 x2, HEAD manifests 200 x1": what upstream served.
pub fn summarize(entries: &[AccessEntry]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for e in entries {
        let kind = ["blobs", "manifests", "tags"]
            .into_iter()
            .find(|k| e.path.contains(&format!("/{k}/")))
            .unwrap_or("other");
        *counts.entry(format!("{} {kind} {}", e.method, e.status)).or_insert(0) += 1;
    }
    let parts: Vec<String> = counts.into_iter().map(|(k, n)| format!("{k} x{n}")).collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

/// A refused pull: the client failed with an authorization error (whatever
/// words it uses for it), never a TLS or protocol error.
#[track_caller]
pub fn assert_refused(out: &Output) {
    assert!(
        !out.success(),
        "`{}` succeeded but must be refused:\n{}",
        out.cmd,
        out.stdout
    );
    let all = format!("{}\n{}", out.stdout, out.stderr);
    let lower = all.to_lowercase();
    assert!(
        ["unauthorized", "authentication required", "pull access denied"]
            .iter()
            .any(|w| lower.contains(w)),
        "`{}`: expected an authorization error:\n{all}",
        out.cmd
    );
    for bad in ["x509", "certificate", "tls: ", "malformed", "unexpected eof"] {
        assert!(!lower.contains(bad), "`{}`: error mentions {bad:?}:\n{all}", out.cmd);
    }
}
