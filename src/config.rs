//! The TOML configuration: its schema, parsing and validation.
//!
//! Unknown keys are errors, and every error names the key that is wrong, so a
//! typo never silently turns a setting off. Nothing here opens a socket; the
//! checks only read the files the config names.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::reference::valid_component;
use crate::tag_policy::{RepositoryRules, TagPolicy, TagRules};

/// The configuration shipped in the repository and embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../config.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub ca: CaConfig,
    pub cache: CacheConfig,
    #[serde(default)]
    pub resolver: ResolverConfig,
    #[serde(default)]
    pub access: AccessConfig,
    #[serde(rename = "upstream", default)]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[[local]]`: namespaces regmirror hosts itself (pushes land here).
    #[serde(rename = "local", default)]
    pub locals: Vec<LocalConfig>,
    /// `[connect]`: what the CONNECT proxy listener (`server.connect`)
    /// tunnels without intercepting, and who may use it.
    #[serde(default)]
    pub connect: ConnectConfig,
    /// `[[warm]]`: images pulled into the cache on a schedule.
    #[serde(default)]
    pub warm: Vec<WarmConfig>,
    /// `[[webhook]]`: where events (pulls, pushes, misses, evictions,
    /// upstreams going down and up) are POSTed.
    #[serde(rename = "webhook", default)]
    pub webhooks: Vec<WebhookConfig>,
    /// `[cluster]`: the other replicas on the same bucket, which a cold
    /// digest is fetched through (its owner) so the cluster fetches it once.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This replica's plain listener as the others reach it
    /// (`http://10.0.0.1:5000`); `${VAR}` is replaced from the environment
    /// (`http://${POD_IP}:5000`), since one config serves every replica.
    #[serde(rename = "self")]
    pub self_url: String,
    /// Every member, this one included.
    pub peers: Option<Vec<String>>,
    /// A name whose addresses are the members (a Kubernetes headless
    /// Service), with `self`'s scheme and port; looked up again every 10 s.
    pub peers_dns: Option<String>,
    /// The secret every member shares; peer requests are signed with it.
    pub secret_file: PathBuf,
    /// How long to wait for the owner to take a connection before fetching
    /// from upstream directly (default `"1s"`).
    pub owner_timeout: Option<String>,
}

/// `[[webhook]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// Event names to send (default: every kind).
    pub events: Option<Vec<String>>,
    /// A file holding the HMAC-SHA256 key the body is signed with.
    pub secret_file: Option<PathBuf>,
    /// Events kept for delivery while the receiver is down.
    pub queue: Option<usize>,
}

/// `[[warm]]`: images pulled into the cache without a client, every `every`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    pub images: Vec<String>,
    /// `os/arch` of multi-platform images to take (default: every one).
    pub platforms: Option<Vec<String>>,
    pub every: String,
}

/// `[connect]` as written. Every key is optional: by default only the
/// intercepted hostnames are reachable through the CONNECT listener, so it
/// is never an open proxy unless an operator says so.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// Host patterns (`"*.example.com"`, `"*"`) tunnelled byte-for-byte.
    #[serde(default)]
    pub passthrough: Vec<String>,
    /// Ports besides 443 that passthrough hosts may be reached on.
    #[serde(default)]
    pub passthrough_ports: Vec<u16>,
    /// `true`: clients must send `Proxy-Authorization` (the local
    /// namespace's htpasswd unless `htpasswd` names another file).
    #[serde(default)]
    pub proxy_auth: bool,
    /// An htpasswd file (bcrypt) for `Proxy-Authorization`; implies `proxy_auth`.
    pub htpasswd: Option<PathBuf>,
}

/// One `[[local]]` namespace as written: a private registry under
/// `/v2/<namespace>/...`, with its own logins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    pub namespace: String,
    pub htpasswd: PathBuf,
    pub writers: Option<Vec<String>>,
    pub readers: Option<Vec<String>>,
    #[serde(default)]
    pub anonymous_pull: bool,
    #[serde(default)]
    pub delete: bool,
    pub quota: Option<String>,
    /// An upload session with no request for this long is removed.
    pub upload_timeout: Option<String>,
    pub max_uploads_per_user: Option<usize>,
}

/// `[limits]`: what one client, or all of them together, can make regmirror
/// hold. Every key is optional; an absent key keeps its safe default (see
/// [`Limits::default`]). Durations are strings with a unit (`"500ms"`,
/// `"10s"`, `"2m"`), sizes strings like `"64MiB"`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub handshake_timeout: Option<String>,
    pub first_request_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub h2_max_streams: Option<u32>,
    pub memory_budget: Option<String>,
    pub download_concurrency: Option<usize>,
}

/// Who may use the proxy at all, by client address.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// CIDR ranges (`10.0.0.0/8`, `::1/128`) or single addresses; empty
    /// means everyone.
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TLS listener; absent disables it.
    pub https: Option<String>,
    /// Plain HTTP listener; absent disables it.
    pub http: Option<String>,
    /// HTTP CONNECT proxy listener (clients set `HTTPS_PROXY`); absent disables it.
    pub connect: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_size: String,
    /// Where eviction stops once the store passed `max_size`: a share of
    /// it (`"90%"`, the default) or a size (`"45GiB"`).
    pub low_water: Option<String>,
    /// Where content and records live: `"disk"` (the default, `dir`) or
    /// `"s3"` (a bucket shared by every replica; `dir` and `max_size` are
    /// then this replica's local read cache in front of it).
    pub backend: Option<String>,
    pub bucket: Option<String>,
    /// The S3 endpoint (`http://garage:3900`); AWS's when left out.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Keys under this prefix (`"regmirror/"`), so one bucket can hold
    /// other things too.
    pub prefix: Option<String>,
    /// An AWS shared-credentials file (`[default]`, `aws_access_key_id`,
    /// `aws_secret_access_key`); without it the standard AWS environment
    /// variables are used.
    pub credentials_file: Option<PathBuf>,
    /// The bucket's own bound (`backend = "s3"`): least recently used
    /// content leaves the bucket above it, down to 90% of it. Unbounded
    /// when left out.
    pub bucket_max_size: Option<String>,
}

/// How upstream hostnames are resolved. regmirror never reads /etc/hosts for
/// this (the host it runs on may point registry names at regmirror itself);
/// `overrides` pins names to addresses, which is what tests and split-horizon
/// setups need.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    #[serde(default)]
    pub overrides: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    pub hosts: Vec<String>,
    /// One URL: the same as a one-element `urls`.
    pub url: Option<String>,
    /// URLs tried in order (regional mirrors, then the registry itself).
    pub urls: Option<Vec<String>>,
    /// Further passes over the URLs after a failure (default 2).
    pub retries: Option<u32>,
    /// Wait before the first retry, doubled for each later one (default `"1s"`).
    pub retry_delay: Option<String>,
    pub namespace: String,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Serve what `username` can read to every client of the proxy.
    #[serde(default)]
    pub share_private: bool,
    /// What may be pulled through the proxy at all (`library/*`, `org/**`).
    pub repositories: Option<Vec<String>>,
    /// CDN hosts on private networks that redirects may lead to.
    #[serde(default)]
    pub private_redirect_hosts: Vec<String>,
    /// How long a tag upstream confirmed is answered without asking again
    /// (default `"0s"`: asked on every request).
    pub tag_check_interval: Option<String>,
    /// Tags (regular expressions) that never move once seen.
    pub immutable_tags: Option<Vec<String>>,
    /// Tags matching `immutable_tags` that are asked about all the same.
    pub immutable_tags_exclude: Option<Vec<String>>,
    /// Other tag rules for some of the upstream's repositories.
    #[serde(default)]
    pub tag_policy: Vec<TagPolicyConfig>,
}

/// `[[upstream.tag_policy]]`: tag rules for the repositories matching
/// `repositories`; a key left out keeps the upstream's value.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagPolicyConfig {
    pub repositories: Vec<String>,
    pub tag_check_interval: Option<String>,
    pub immutable_tags: Option<Vec<String>>,
    pub immutable_tags_exclude: Option<Vec<String>>,
}

/// A configuration that passed every check, with values parsed into the
/// types the rest of the program uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub server_name: String,
    pub ca_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Where content and records live besides `cache_dir`; `None`: only there.
    pub bucket: Option<BucketSettings>,
    pub max_size: u64,
    /// Bytes eviction brings the store down to (below `max_size`).
    pub low_water: u64,
    pub resolver_overrides: BTreeMap<String, IpAddr>,
    /// Client networks allowed to connect; empty: everyone.
    pub access_allow: Vec<ipnet::IpNet>,
    pub upstreams: Vec<Upstream>,
    pub limits: Limits,
    pub locals: Vec<LocalNamespace>,
    /// The CONNECT proxy listener; `None` disables it.
    pub connect: Option<SocketAddr>,
    pub connect_policy: ConnectPolicy,
    pub warm: Vec<WarmSchedule>,
    pub webhooks: Vec<Webhook>,
    pub cluster: Option<Cluster>,
}

/// A validated `[cluster]`.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub self_url: url::Url,
    pub members: ClusterMembers,
    pub secret: SigningKey,
    pub owner_timeout: Duration,
}

/// Who the members are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterMembers {
    /// `peers`: fixed, `self` among them.
    Listed(Vec<url::Url>),
    /// `peers_dns`: the addresses of this name.
    Dns(String),
}

/// A validated `[cache] backend = "s3"`: the bucket every replica shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSettings {
    pub bucket: String,
    pub endpoint: Option<url::Url>,
    pub region: Option<String>,
    /// Empty, or ends with `/`.
    pub prefix: String,
    pub credentials_file: Option<PathBuf>,
    /// `cache.bucket_max_size` in bytes; `None`: unbounded.
    pub max_size: Option<u64>,
}

/// Events a `[[webhook]]` keeps when `queue` is left out: a few hours of
/// a busy mirror's pulls while a receiver restarts, a few MiB of memory.
pub const DEFAULT_WEBHOOK_QUEUE: usize = 10_000;
/// The largest `queue`: beyond it a dead receiver costs real memory.
pub const MAX_WEBHOOK_QUEUE: usize = 1_000_000;

/// A validated `[[webhook]]`.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: url::Url,
    /// The kinds it is sent, each once, in the order of [`crate::events::Kind::ALL`].
    pub events: Vec<crate::events::Kind>,
    pub secret: Option<SigningKey>,
    pub queue: usize,
}

/// The key of a signature (a webhook's, the cluster's peer requests), kept out of
/// `Debug` output (logs).
#[derive(Clone)]
pub struct SigningKey(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

/// A validated `[[warm]]`.
#[derive(Debug, Clone)]
pub struct WarmSchedule {
    /// Each names a configured upstream (checked).
    pub images: Vec<String>,
    pub platforms: Platforms,
    pub every: Duration,
}

/// A validated `[connect]`.
#[derive(Debug, Clone, Default)]
pub struct ConnectPolicy {
    /// Lowercase host patterns; `*` matches any run of characters.
    pub passthrough: Vec<String>,
    pub passthrough_ports: Vec<u16>,
    /// Who may use the CONNECT listener; `None`: anyone `[access]` admits.
    pub users: Option<crate::auth::htpasswd::Htpasswd>,
}

/// A validated `[[local]]` namespace.
#[derive(Debug, Clone)]
pub struct LocalNamespace {
    pub namespace: String,
    pub htpasswd_path: PathBuf,
    /// The logins, read and checked (bcrypt only) at start.
    pub users: crate::auth::htpasswd::Htpasswd,
    /// Who may push; `None`: every user in the file.
    pub writers: Option<Vec<String>>,
    /// Who may pull; `None`: every user in the file.
    pub readers: Option<Vec<String>>,
    pub anonymous_pull: bool,
    pub delete: bool,
    /// Bytes the namespace may hold; `None`: no bound but the disk.
    pub quota: Option<u64>,
    pub upload_timeout: Duration,
    pub max_uploads_per_user: usize,
}

/// How long an upload session may go without a request by default.
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Upload sessions one user may hold open at once by default.
pub const DEFAULT_MAX_UPLOADS_PER_USER: usize = 32;

/// The validated `[limits]`: bounds on what clients can make regmirror hold,
/// so that no single client (or a crowd of idle sockets) takes the mirror
/// down for everyone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections on both listeners together. At the cap an
    /// idle connection of the client holding the most makes room; a new
    /// one is refused (answered 503) only when none it may replace is idle.
    pub max_connections: usize,
    /// The share of `max_connections` one client address may hold once
    /// the table is nearly full (the last share of it is kept for lighter
    /// clients); below that there is no per-address limit, since a NAT'd
    /// fleet arrives as one address.
    pub max_connections_per_client: usize,
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// From accept (or the end of the handshake) to a complete first
    /// request head; also bounds the reading of every later HTTP/1 head.
    pub first_request_timeout: Duration,
    /// How long a connection may have nothing to do (no request in flight,
    /// or only responses the client has stopped reading) before it is closed.
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_streams: u32,
    /// Bytes of response bodies in flight (read from the store and not yet
    /// written to a socket) across all connections.
    pub memory_budget: u64,
    /// Concurrent upstream downloads.
    pub download_concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_connections_per_client: 256,
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            h2_max_streams: 16,
            memory_budget: 32 << 20,
            download_concurrency: 16,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub hosts: Vec<String>,
    /// Where the content comes from, in order of preference: each one
    /// serves the same repositories (mirrors of one registry), so a request
    /// that fails on one may be sent to the next.
    pub urls: Vec<url::Url>,
    /// How many more passes over `urls` a failed request makes.
    pub retries: u32,
    /// The wait before the first retry pass; doubled for each later one.
    pub retry_delay: Duration,
    pub namespace: String,
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Docker Hub keeps official images under `library/`.
    pub library_prefix: bool,
    /// Everyone who can reach the proxy may read what `credentials` can.
    pub share_private: bool,
    /// When set, only repositories matching one of these are served.
    pub repositories: Option<Vec<crate::auth::access::RepoPattern>>,
    pub private_redirect_hosts: Vec<String>,
    /// When a tag may be answered without asking upstream.
    pub tag_policy: crate::tag_policy::TagPolicy,
}

/// Which platforms of a multi-platform image are warmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platforms {
    Every,
    /// `os/arch` (or `os/arch/variant`) names; each must be in the index.
    Only(Vec<String>),
}

/// An image as `warm` names it: `[host/]repo[:tag|@digest]`, host one of
/// an upstream's names or hosts (default docker.io).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Index into the configured upstreams.
    pub upstream: usize,
    /// The repository as upstream names it (`library/` added for Docker Hub).
    pub repo: crate::reference::RepoName,
    pub reference: String,
}

/// Parses an image name against the configured upstreams.
pub fn parse_image(upstreams: &[Upstream], image: &str) -> Result<ImageRef, String> {
    let (first, rest) = image.split_once('/').unwrap_or(("", image));
    let is_host = first.contains('.') || first.contains(':') || first == "localhost";
    let (host, path) = if is_host { (first, rest) } else { ("docker.io", image) };
    let upstream = upstreams
        .iter()
        .position(|u| u.name == host || u.hosts.iter().any(|h| h == host))
        .ok_or_else(|| format!("{image}: no configured upstream serves {host}"))?;
    let (name, reference) = match path.split_once('@') {
        Some((n, d)) => (n, d.to_string()),
        None => match path.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, t.to_string()),
            _ => (path, "latest".to_string()),
        },
    };
    let mut repo = crate::reference::RepoName::parse(name).map_err(|e| format!("{image}: {e}"))?;
    if upstreams[upstream].library_prefix {
        repo = repo.with_library_prefix();
    }
    Ok(ImageRef {
        upstream,
        repo,
        reference,
    })
}

#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Settings {
    /// Reads `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::from_toml(&text, &p.display().to_string())
            }
            None => Self::from_toml(DEFAULT_CONFIG, "built-in config.toml"),
        }
    }

    pub fn from_toml(text: &str, origin: &str) -> Result<Settings, ConfigError> {
        let raw: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        validate(raw).map_err(|(key, message)| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        })
    }

    /// The upstream that serves requests naming no registry (docker's
    /// `registry-mirrors`): Docker Hub when configured, else the first.
    pub fn default_upstream(&self) -> usize {
        self.upstreams.iter().position(|u| u.library_prefix).unwrap_or(0)
    }

    /// What an operator should know about this configuration though it is
    /// valid: said by `check` and logged by `serve`.
    pub fn warnings(&self) -> Vec<String> {
        let names = self.tls_names();
        let mut out = Vec::new();
        for parent in &names {
            let under: Vec<&String> = names.iter().filter(|n| n.ends_with(&format!(".{parent}"))).collect();
            if !under.is_empty() {
                out.push(format!(
                    "host {parent:?} is a parent of {under:?}: the CA's name constraints then admit every name under {parent:?} (e.g. auth.{parent}); list only the hosts clients connect to"
                ));
            }
        }
        out
    }

    /// Every hostname the CA may sign for: the upstreams' plus our own.
    pub fn tls_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.upstreams.iter().flat_map(|u| u.hosts.iter().cloned()).collect();
        names.push(self.server_name.clone());
        names.sort();
        names.dedup();
        names
    }
}

type Invalid = (String, String);

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    (key.into(), message.into())
}

/// A member's address: `http://host:port` and nothing more (peer requests
/// add their own paths).
fn member_url(key: &str, raw: &str) -> Result<url::Url, Invalid> {
    let u = url::Url::parse(raw).map_err(|e| invalid(key, format!("{raw:?}: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() || u.path() != "/" || u.query().is_some() {
        return Err(invalid(
            key,
            format!("{raw:?} must be http(s)://host:port, nothing after"),
        ));
    }
    Ok(u)
}

/// Replaces `${NAME}` with the environment's NAME; an unset one is an error.
fn expand_env(key: &str, raw: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Invalid> {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(invalid(key, format!("{raw:?}: unclosed ${{")));
        };
        let name = &after[..end];
        let value = env(name).ok_or_else(|| invalid(key, format!("{raw:?}: ${{{name}}} is not set")))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn validate_cluster(c: &ClusterConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Cluster, Invalid> {
    let self_url = member_url("cluster.self", &expand_env("cluster.self", &c.self_url, env)?)?;
    let members = match (&c.peers, &c.peers_dns) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(invalid(
                "cluster",
                "set exactly one of cluster.peers and cluster.peers_dns",
            ));
        }
        (Some(peers), None) => {
            let mut urls = Vec::new();
            for p in peers {
                urls.push(member_url("cluster.peers", p)?);
            }
            if !urls.contains(&self_url) {
                return Err(invalid(
                    "cluster.peers",
                    format!("must list this replica's own address ({self_url}, cluster.self) too"),
                ));
            }
            urls.sort();
            urls.dedup();
            ClusterMembers::Listed(urls)
        }
        (None, Some(name)) => {
            if !valid_hostname(name) {
                return Err(invalid(
                    "cluster.peers_dns",
                    format!("{name:?} is not a valid DNS name"),
                ));
            }
            ClusterMembers::Dns(name.clone())
        }
    };
    let text = std::fs::read(&c.secret_file).map_err(|e| {
        invalid(
            "cluster.secret_file",
            format!("cannot read {}: {e}", c.secret_file.display()),
        )
    })?;
    let secret = String::from_utf8_lossy(&text).trim().as_bytes().to_vec();
    if secret.len() < 16 {
        return Err(invalid(
            "cluster.secret_file",
            format!(
                "{} holds fewer than 16 bytes: too easy to guess",
                c.secret_file.display()
            ),
        ));
    }
    let owner_timeout = match c.owner_timeout.as_deref() {
        None => Duration::from_secs(1),
        Some(t) => parse_duration(t).map_err(|m| invalid("cluster.owner_timeout", m))?,
    };
    Ok(Cluster {
        self_url,
        members,
        secret: SigningKey(secret.into()),
        owner_timeout,
    })
}

/// `[cache] backend` and the bucket keys: refused when set for a backend
/// that does not use them, so a typo never silently keeps content on disk.
fn validate_backend(c: &CacheConfig) -> Result<Option<BucketSettings>, Invalid> {
    let bucket_keys = [
        ("cache.bucket", c.bucket.is_some()),
        ("cache.endpoint", c.endpoint.is_some()),
        ("cache.region", c.region.is_some()),
        ("cache.prefix", c.prefix.is_some()),
        ("cache.credentials_file", c.credentials_file.is_some()),
        ("cache.bucket_max_size", c.bucket_max_size.is_some()),
    ];
    match c.backend.as_deref().unwrap_or("disk") {
        "disk" => {
            if let Some((key, _)) = bucket_keys.iter().find(|(_, set)| *set) {
                return Err(invalid(*key, "is only read with cache.backend = \"s3\""));
            }
            Ok(None)
        }
        "s3" => {
            let bucket = c.bucket.as_deref().map(str::trim).unwrap_or_default();
            if bucket.is_empty() {
                return Err(invalid("cache.bucket", "is required with cache.backend = \"s3\""));
            }
            let endpoint = match c.endpoint.as_deref() {
                None => None,
                Some(e) => {
                    let u = url::Url::parse(e).map_err(|err| invalid("cache.endpoint", format!("{e:?}: {err}")))?;
                    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                        return Err(invalid(
                            "cache.endpoint",
                            format!("{e:?} is not an http:// or https:// URL"),
                        ));
                    }
                    Some(u)
                }
            };
            let mut prefix = c.prefix.as_deref().unwrap_or_default().trim_matches('/').to_string();
            if prefix.split('/').any(|p| p == "." || p == "..") {
                return Err(invalid(
                    "cache.prefix",
                    format!("{prefix:?} must not hold . or .. components"),
                ));
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            let max_size = match c.bucket_max_size.as_deref() {
                None => None,
                Some(v) => Some(parse_size(v).map_err(|m| invalid("cache.bucket_max_size", m))?),
            };
            Ok(Some(BucketSettings {
                max_size,
                bucket: bucket.to_string(),
                endpoint,
                region: c.region.clone(),
                prefix,
                credentials_file: c.credentials_file.clone(),
            }))
        }
        other => Err(invalid(
            "cache.backend",
            format!("{other:?}: expected \"disk\" or \"s3\""),
        )),
    }
}

fn validate(raw: Config) -> Result<Settings, Invalid> {
    let https = parse_addr("server.https", raw.server.https.as_deref())?;
    let http = parse_addr("server.http", raw.server.http.as_deref())?;
    let connect = parse_addr("server.connect", raw.server.connect.as_deref())?;
    if https.is_none() && http.is_none() && connect.is_none() {
        return Err(invalid(
            "server",
            "at least one of `https`, `http` and `connect` must be set",
        ));
    }
    let server_name = raw.server.name.to_ascii_lowercase();
    if !valid_hostname(&server_name) {
        return Err(invalid(
            "server.name",
            format!("{:?} is not a valid DNS hostname", raw.server.name),
        ));
    }
    if raw.ca.dir.as_os_str().is_empty() {
        return Err(invalid("ca.dir", "must not be empty"));
    }
    if raw.cache.dir.as_os_str().is_empty() {
        return Err(invalid("cache.dir", "must not be empty"));
    }
    let max_size = parse_size(&raw.cache.max_size).map_err(|m| invalid("cache.max_size", m))?;
    let low_water = match raw.cache.low_water.as_deref().map(str::trim) {
        None => max_size / 10 * 9,
        Some(v) => match v.strip_suffix('%') {
            Some(pct) => {
                let pct: f64 = pct
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p: &f64| *p > 0.0 && *p < 100.0)
                    .ok_or_else(|| {
                        invalid(
                            "cache.low_water",
                            format!("{v:?} must be a percentage between 0% and 100%, like \"90%\""),
                        )
                    })?;
                (max_size as f64 * pct / 100.0) as u64
            }
            None => {
                let bytes = parse_size(v).map_err(|m| invalid("cache.low_water", m))?;
                if bytes >= max_size {
                    return Err(invalid(
                        "cache.low_water",
                        format!("{v:?} must be below cache.max_size ({})", raw.cache.max_size),
                    ));
                }
                bytes
            }
        },
    };

    let mut resolver_overrides = BTreeMap::new();
    for (name, addr) in raw.resolver.overrides {
        let ip: IpAddr = addr.parse().map_err(|_| {
            invalid(
                format!("resolver.overrides.{name:?}"),
                format!("{addr:?} is not an IP address"),
            )
        })?;
        resolver_overrides.insert(name.to_ascii_lowercase(), ip);
    }

    let mut access_allow = Vec::new();
    for (i, a) in raw.access.allow.iter().enumerate() {
        let net = a
            .parse::<ipnet::IpNet>()
            .or_else(|_| a.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                invalid(
                    format!("access.allow[{i}]"),
                    format!("{a:?} is not a CIDR range or address"),
                )
            })?;
        access_allow.push(net);
    }

    if raw.upstreams.is_empty() {
        return Err(invalid("upstream", "at least one [[upstream]] is required"));
    }
    let mut names = HashSet::new();
    let mut namespaces = HashSet::new();
    let mut all_hosts = HashSet::new();
    let mut upstreams = Vec::new();
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let key = |field: &str| format!("upstream[{i}].{field}");
        let tag_policy = validate_tag_policy(&u, &key)?;
        if u.name.is_empty() {
            return Err(invalid(key("name"), "must not be empty"));
        }
        if !names.insert(u.name.clone()) {
            return Err(invalid(key("name"), format!("{:?} is used by two upstreams", u.name)));
        }
        if !valid_component(&u.namespace) || u.namespace.starts_with('_') {
            return Err(invalid(
                key("namespace"),
                format!(
                    "{:?} must be one lowercase repository-name component, like \"dockerhub\"",
                    u.namespace
                ),
            ));
        }
        if !namespaces.insert(u.namespace.clone()) {
            return Err(invalid(
                key("namespace"),
                format!("{:?} is used by two upstreams", u.namespace),
            ));
        }
        if u.hosts.is_empty() {
            return Err(invalid(key("hosts"), "must list at least one hostname"));
        }
        let mut hosts = Vec::new();
        for h in &u.hosts {
            let h = h.to_ascii_lowercase();
            if !valid_hostname(&h) {
                return Err(invalid(key("hosts"), format!("{h:?} is not a valid DNS hostname")));
            }
            if h == server_name {
                return Err(invalid(key("hosts"), format!("{h:?} is also server.name")));
            }
            if !all_hosts.insert(h.clone()) {
                return Err(invalid(key("hosts"), format!("{h:?} is listed by two upstreams")));
            }
            hosts.push(h);
        }
        let listed = match (u.url, u.urls) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    key("urls"),
                    format!("upstream {:?} sets both `url` and `urls`: keep one", u.name),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    key("url"),
                    format!("upstream {:?} needs `url` or `urls`", u.name),
                ))
            }
            (Some(one), None) => vec![("url".to_string(), one)],
            (None, Some(list)) if list.is_empty() => {
                return Err(invalid(
                    key("urls"),
                    format!("upstream {:?}: must list at least one URL", u.name),
                ))
            }
            (None, Some(list)) => list
                .into_iter()
                .enumerate()
                .map(|(j, v)| (format!("urls[{j}]"), v))
                .collect(),
        };
        let mut urls: Vec<url::Url> = Vec::new();
        for (field, text) in listed {
            let url = parse_upstream_url(&text).map_err(|m| invalid(key(&field), m))?;
            if urls.contains(&url) {
                return Err(invalid(key(&field), format!("{text:?} is listed twice")));
            }
            urls.push(url);
        }
        let retries = match u.retries {
            None => 2,
            Some(n @ 0..=10) => n,
            Some(n) => return Err(invalid(key("retries"), format!("{n} is more than 10"))),
        };
        let retry_delay = match u.retry_delay.as_deref() {
            None => Duration::from_secs(1),
            Some(v) => {
                let d = parse_duration(v).map_err(|m| invalid(key("retry_delay"), m))?;
                if d > Duration::from_secs(60) {
                    return Err(invalid(key("retry_delay"), format!("{v:?} is more than 60s")));
                }
                d
            }
        };
        if let Some(ca) = &u.ca_file {
            check_pem(ca).map_err(|m| invalid(key("ca_file"), m))?;
        }
        let credentials = match (u.username, u.password_file) {
            (None, None) => None,
            (Some(_), None) => return Err(invalid(key("password_file"), "is required when username is set")),
            (None, Some(_)) => return Err(invalid(key("username"), "is required when password_file is set")),
            (Some(username), Some(pf)) => {
                let password = std::fs::read_to_string(&pf)
                    .map_err(|e| invalid(key("password_file"), format!("cannot read {}: {e}", pf.display())))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if password.is_empty() {
                    return Err(invalid(key("password_file"), format!("{} is empty", pf.display())));
                }
                Some(Credentials { username, password })
            }
        };
        let library_prefix =
            u.name == "docker.io" || hosts.iter().any(|h| h == "docker.io" || h.ends_with(".docker.io"));
        if u.share_private && credentials.is_none() {
            return Err(invalid(
                key("share_private"),
                "needs username and password_file to share",
            ));
        }
        let repositories = match u.repositories {
            None => None,
            Some(list) => Some(repo_patterns(&list, &key("repositories"))?),
        };
        let mut private_redirect_hosts = Vec::new();
        for h in &u.private_redirect_hosts {
            let h = h.to_ascii_lowercase();
            if !valid_hostname(&h) && h.parse::<IpAddr>().is_err() {
                return Err(invalid(
                    key("private_redirect_hosts"),
                    format!("{h:?} is not a hostname or address"),
                ));
            }
            private_redirect_hosts.push(h);
        }
        upstreams.push(Upstream {
            name: u.name,
            hosts,
            urls,
            retries,
            retry_delay,
            namespace: u.namespace,
            ca_file: u.ca_file,
            credentials,
            library_prefix,
            share_private: u.share_private,
            repositories,
            private_redirect_hosts,
            tag_policy,
        });
    }

    let limits = validate_limits(raw.limits)?;
    let locals = validate_locals(raw.locals, &namespaces)?;
    let bucket = validate_backend(&raw.cache)?;
    let connect_policy = validate_connect(raw.connect, &locals)?;
    let warm = validate_warm(raw.warm, &upstreams)?;
    let webhooks = validate_webhooks(raw.webhooks)?;
    let cluster = match &raw.cluster {
        None => None,
        Some(c) => {
            if bucket.is_none() {
                return Err(invalid(
                    "cluster",
                    "replicas share content through a bucket: set cache.backend = \"s3\"",
                ));
            }
            Some(validate_cluster(c, &|v| std::env::var(v).ok())?)
        }
    };

    Ok(Settings {
        https,
        http,
        server_name,
        ca_dir: raw.ca.dir,
        cache_dir: raw.cache.dir,
        bucket,
        max_size,
        low_water,
        resolver_overrides,
        access_allow,
        upstreams,
        limits,
        locals,
        connect,
        connect_policy,
        warm,
        webhooks,
        cluster,
    })
}

fn validate_webhooks(raw: Vec<WebhookConfig>) -> Result<Vec<Webhook>, Invalid> {
    use crate::events::Kind;
    let mut out = Vec::new();
    for (i, w) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("webhook[{i}].{k}");
        let url = url::Url::parse(&w.url).map_err(|e| invalid(key("url"), format!("{:?}: {e}", w.url)))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return Err(invalid(
                key("url"),
                format!("{:?} must be an http:// or https:// URL with a host", w.url),
            ));
        }
        let events = match w.events {
            None => Kind::ALL.to_vec(),
            Some(names) => {
                if names.is_empty() {
                    return Err(invalid(key("events"), "leave it out to send every event"));
                }
                let mut wanted = Vec::new();
                for (j, name) in names.iter().enumerate() {
                    let kind = Kind::parse(name).ok_or_else(|| {
                        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                        invalid(
                            key(&format!("events[{j}]")),
                            format!("{name:?} is not an event (one of {})", known.join(", ")),
                        )
                    })?;
                    wanted.push(kind);
                }
                Kind::ALL.into_iter().filter(|k| wanted.contains(k)).collect()
            }
        };
        let secret = match &w.secret_file {
            None => None,
            Some(path) => {
                let text = std::fs::read(path)
                    .map_err(|e| invalid(key("secret_file"), format!("cannot read {}: {e}", path.display())))?;
                let mut bytes = text.as_slice();
                while let [rest @ .., b'\n' | b'\r'] = bytes {
                    bytes = rest;
                }
                if bytes.is_empty() {
                    return Err(invalid(key("secret_file"), format!("{} is empty", path.display())));
                }
                Some(SigningKey(bytes.into()))
            }
        };
        let queue = match w.queue {
            None => DEFAULT_WEBHOOK_QUEUE,
            Some(n) if (1..=MAX_WEBHOOK_QUEUE).contains(&n) => n,
            Some(n) => {
                return Err(invalid(
                    key("queue"),
                    format!("{n} is not between 1 and {MAX_WEBHOOK_QUEUE}"),
                ))
            }
        };
        out.push(Webhook {
            url,
            events,
            secret,
            queue,
        });
    }
    Ok(out)
}

fn validate_warm(raw: Vec<WarmConfig>, upstreams: &[Upstream]) -> Result<Vec<WarmSchedule>, Invalid> {
    let mut out = Vec::new();
    for (i, w) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("warm[{i}].{k}");
        if w.images.is_empty() {
            return Err(invalid(key("images"), "must name at least one image"));
        }
        for (j, image) in w.images.iter().enumerate() {
            parse_image(upstreams, image).map_err(|m| invalid(key(&format!("images[{j}]")), m))?;
        }
        let platforms = match w.platforms {
            None => Platforms::Every,
            Some(list) => {
                for (j, p) in list.iter().enumerate() {
                    let parts: Vec<&str> = p.split('/').collect();
                    let named = |c: &&str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                    if !(2..=3).contains(&parts.len()) || !parts.iter().all(named) {
                        return Err(invalid(
                            key(&format!("platforms[{j}]")),
                            format!("{p:?} is not a platform like \"linux/amd64\" or \"linux/arm64/v8\""),
                        ));
                    }
                }
                if list.is_empty() {
                    return Err(invalid(key("platforms"), "leave it out to warm every platform"));
                }
                Platforms::Only(list)
            }
        };
        let every = parse_duration(&w.every).map_err(|m| invalid(key("every"), m))?;
        out.push(WarmSchedule {
            images: w.images,
            platforms,
            every,
        });
    }
    Ok(out)
}

fn repo_patterns(list: &[String], key: &str) -> Result<Vec<crate::auth::access::RepoPattern>, Invalid> {
    list.iter()
        .enumerate()
        .map(|(j, p)| crate::auth::access::RepoPattern::parse(p).map_err(|m| invalid(format!("{key}[{j}]"), m)))
        .collect()
}

/// The upstream's tag rules, then each `[[upstream.tag_policy]]` on top of
/// them (a key it leaves out keeps the upstream's value).
fn validate_tag_policy(u: &UpstreamConfig, key: &dyn Fn(&str) -> String) -> Result<TagPolicy, Invalid> {
    let defaults = TagRules::default();
    let upstream = tag_rules(
        key,
        u.tag_check_interval.as_deref(),
        u.immutable_tags.as_deref(),
        u.immutable_tags_exclude.as_deref(),
        &defaults,
    )?;
    let mut by_repository = Vec::new();
    for (j, p) in u.tag_policy.iter().enumerate() {
        let key = |field: &str| key(&format!("tag_policy[{j}].{field}"));
        if p.repositories.is_empty() {
            return Err(invalid(
                key("repositories"),
                "must name at least one repository pattern",
            ));
        }
        by_repository.push(RepositoryRules {
            repositories: repo_patterns(&p.repositories, &key("repositories"))?,
            rules: tag_rules(
                &key,
                p.tag_check_interval.as_deref(),
                p.immutable_tags.as_deref(),
                p.immutable_tags_exclude.as_deref(),
                &upstream,
            )?,
        });
    }
    Ok(TagPolicy {
        upstream,
        by_repository,
    })
}

fn tag_rules(
    key: &dyn Fn(&str) -> String,
    interval: Option<&str>,
    immutable: Option<&[String]>,
    exclude: Option<&[String]>,
    inherit: &TagRules,
) -> Result<TagRules, Invalid> {
    let patterns = |field: &str, list: Option<&[String]>, inherited: &[regex::Regex]| match list {
        None => Ok(inherited.to_vec()),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(j, p)| crate::tag_policy::compile(p).map_err(|m| invalid(key(&format!("{field}[{j}]")), m)))
            .collect(),
    };
    let check_interval = match interval {
        None => inherit.check_interval,
        Some(v) => parse_duration_or_zero(v).map_err(|m| invalid(key("tag_check_interval"), m))?,
    };
    Ok(TagRules {
        check_interval,
        immutable: patterns("immutable_tags", immutable, &inherit.immutable)?,
        immutable_exclude: patterns("immutable_tags_exclude", exclude, &inherit.immutable_exclude)?,
    })
}

fn validate_connect(raw: ConnectConfig, locals: &[LocalNamespace]) -> Result<ConnectPolicy, Invalid> {
    let mut passthrough = Vec::new();
    for (i, p) in raw.passthrough.iter().enumerate() {
        let p = p.trim().to_ascii_lowercase();
        let literal = p.replace('*', "a");
        let ok = !p.is_empty()
            && (p == "*" || valid_hostname(literal.trim_start_matches("a.")) || literal.parse::<IpAddr>().is_ok());
        if !ok {
            return Err(invalid(
                format!("connect.passthrough[{i}]"),
                format!("{p:?} is not a host pattern like \"*.example.com\" or \"*\""),
            ));
        }
        passthrough.push(p);
    }
    for (i, port) in raw.passthrough_ports.iter().enumerate() {
        if *port == 0 {
            return Err(invalid(format!("connect.passthrough_ports[{i}]"), "0 is not a port"));
        }
    }
    let users = match (&raw.htpasswd, raw.proxy_auth) {
        (Some(path), _) => {
            Some(crate::auth::htpasswd::Htpasswd::load(path).map_err(|e| invalid("connect.htpasswd", e.to_string()))?)
        }
        (None, false) => None,
        (None, true) => {
            let mut files: Vec<&LocalNamespace> = locals.iter().collect();
            files.dedup_by(|a, b| a.htpasswd_path == b.htpasswd_path);
            match files.as_slice() {
                [one] => Some(one.users.clone()),
                [] => {
                    return Err(invalid(
                        "connect.proxy_auth",
                        "needs connect.htpasswd, or a [[local]] namespace whose htpasswd it uses",
                    ))
                }
                _ => {
                    return Err(invalid(
                        "connect.proxy_auth",
                        "the [[local]] namespaces use different htpasswd files: name one in connect.htpasswd",
                    ))
                }
            }
        }
    };
    Ok(ConnectPolicy {
        passthrough,
        passthrough_ports: raw.passthrough_ports,
        users,
    })
}

fn validate_locals(
    raw: Vec<LocalConfig>,
    upstream_namespaces: &HashSet<String>,
) -> Result<Vec<LocalNamespace>, Invalid> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, l) in raw.into_iter().enumerate() {
        let key = |k: &str| format!("local[{i}].{k}");
        if !valid_component(&l.namespace) {
            return Err(invalid(
                key("namespace"),
                format!("{:?} is not a repository name component", l.namespace),
            ));
        }
        if upstream_namespaces.contains(&l.namespace) {
            return Err(invalid(
                key("namespace"),
                format!("{:?} is also an upstream's namespace", l.namespace),
            ));
        }
        if !seen.insert(l.namespace.clone()) {
            return Err(invalid(key("namespace"), format!("{:?} is used twice", l.namespace)));
        }
        let users =
            crate::auth::htpasswd::Htpasswd::load(&l.htpasswd).map_err(|e| invalid(key("htpasswd"), e.to_string()))?;
        for (field, list) in [("writers", &l.writers), ("readers", &l.readers)] {
            for name in list.iter().flatten() {
                if !users.has_user(name) {
                    return Err(invalid(
                        key(field),
                        format!("{name:?} is not a user in {}", l.htpasswd.display()),
                    ));
                }
            }
        }
        let quota = match l.quota.as_deref() {
            None => None,
            Some(v) => Some(parse_size(v).map_err(|m| invalid(key("quota"), m))?),
        };
        let upload_timeout = match l.upload_timeout.as_deref() {
            None => DEFAULT_UPLOAD_TIMEOUT,
            Some(v) => parse_duration(v).map_err(|m| invalid(key("upload_timeout"), m))?,
        };
        let max_uploads_per_user = match l.max_uploads_per_user {
            None => DEFAULT_MAX_UPLOADS_PER_USER,
            Some(0) => return Err(invalid(key("max_uploads_per_user"), "must be at least 1")),
            Some(n) => n,
        };
        out.push(LocalNamespace {
            namespace: l.namespace,
            htpasswd_path: l.htpasswd,
            users,
            writers: l.writers,
            readers: l.readers,
            anonymous_pull: l.anonymous_pull,
            delete: l.delete,
            quota,
            upload_timeout,
            max_uploads_per_user,
        });
    }
    Ok(out)
}

fn validate_limits(raw: LimitsConfig) -> Result<Limits, Invalid> {
    let d = Limits::default();
    let count = |key: &str, v: Option<usize>, default: usize| match v {
        None => Ok(default),
        Some(0) => Err(invalid(format!("limits.{key}"), "must be at least 1")),
        Some(n) => Ok(n),
    };
    let duration = |key: &str, v: Option<&str>, default: Duration| match v {
        None => Ok(default),
        Some(v) => parse_duration(v).map_err(|m| invalid(format!("limits.{key}"), m)),
    };
    let max_connections = count("max_connections", raw.max_connections, d.max_connections)?;
    let max_connections_per_client = count(
        "max_connections_per_client",
        raw.max_connections_per_client,
        d.max_connections_per_client.min(max_connections),
    )?;
    if max_connections_per_client > max_connections {
        return Err(invalid(
            "limits.max_connections_per_client",
            format!("{max_connections_per_client} is more than limits.max_connections ({max_connections})"),
        ));
    }
    let h2_max_streams = match raw.h2_max_streams {
        None => d.h2_max_streams,
        Some(n @ 1..=1000) => n,
        Some(n) => {
            return Err(invalid(
                "limits.h2_max_streams",
                format!("{n} is not between 1 and 1000"),
            ))
        }
    };
    let memory_budget = match raw.memory_budget.as_deref() {
        None => d.memory_budget,
        Some(v) => {
            let n = parse_size(v).map_err(|m| invalid("limits.memory_budget", m))?;
            if n < 1 << 20 {
                return Err(invalid("limits.memory_budget", format!("{v:?} is less than 1MiB")));
            }
            n
        }
    };
    Ok(Limits {
        max_connections,
        max_connections_per_client,
        handshake_timeout: duration(
            "handshake_timeout",
            raw.handshake_timeout.as_deref(),
            d.handshake_timeout,
        )?,
        first_request_timeout: duration(
            "first_request_timeout",
            raw.first_request_timeout.as_deref(),
            d.first_request_timeout,
        )?,
        idle_timeout: duration("idle_timeout", raw.idle_timeout.as_deref(), d.idle_timeout)?,
        h2_max_streams,
        memory_budget,
        download_concurrency: count("download_concurrency", raw.download_concurrency, d.download_concurrency)?,
    })
}

/// Parses durations like `"500ms"`, `"10s"`, `"2m"`, `"1h"`: a whole number
/// and a unit, more than zero. A bare number is refused so that nobody
/// wonders whether it means seconds or milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like \"10s\" (units ms, s, m, h)"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "" => return Err(format!("{s:?} needs a unit, like \"{n}s\" (units ms, s, m, h)")),
        other => return Err(format!("unknown unit {other:?} in {s:?} (use ms, s, m, h)")),
    };
    if d.is_zero() {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(d)
}

/// A duration where zero means "never" or "always" (`"0s"`).
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim();
    if !digits.is_empty()
        && digits.bytes().all(|b| b == b'0')
        && ["ms", "s", "m", "h"].contains(&t[digits.len()..].trim())
    {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// An upstream URL: http(s), a host, nothing below the root (requests
/// put their own `/v2/...` path on it).
fn parse_upstream_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(format!("{text:?} must be an http:// or https:// URL with a host"));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(format!("{text:?} must not have a path or query"));
    }
    Ok(url)
}

fn parse_addr(key: &str, value: Option<&str>) -> Result<Option<SocketAddr>, Invalid> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| invalid(key, format!("{v:?} is not an address like \"0.0.0.0:443\""))),
    }
}

fn check_pem(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(())
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A size as people read it (`1.5 MiB`, `512 B`), for the cache commands
/// and the status page alike.
pub fn format_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Parses sizes like `50GiB`, `512MiB`, `10GB`, `1000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size like \"50GiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let bytes = n * mult as f64;
    if bytes < 1.0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Settings::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn the_s3_backend_needs_a_bucket_and_its_keys_need_the_backend() {
        let with = |lines: &str| DEFAULT_CONFIG.replacen("[cache]\n", &format!("[cache]\n{lines}\n"), 1);
        let s = Settings::from_toml(
            &with("backend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://garage:3900\"\nprefix = \"/a/b\""),
            "t.toml",
        )
        .unwrap();
        let bucket = s.bucket.expect("the s3 backend");
        assert_eq!((bucket.bucket.as_str(), bucket.prefix.as_str()), ("b", "a/b/"));
        assert_eq!(bucket.endpoint.unwrap().as_str(), "http://garage:3900/");
        assert!(Settings::from_toml(DEFAULT_CONFIG, "t.toml").unwrap().bucket.is_none());

        let e = err(&with("backend = \"s3\""));
        assert!(e.contains("cache.bucket") && e.contains("required"), "{e}");
        let e = err(&with("bucket = \"b\""));
        assert!(e.contains("cache.bucket") && e.contains("only read with"), "{e}");
        let e = err(&with("backend = \"s4\""));
        assert!(e.contains("cache.backend") && e.contains("s4"), "{e}");
        let e = err(&with("backend = \"s3\"\nbucket = \"b\"\nendpoint = \"ftp://x\""));
        assert!(e.contains("cache.endpoint"), "{e}");
        let e = err(&with("backend = \"s3\"\nbucket = \"b\"\nprefix = \"a/../b\""));
        assert!(e.contains("cache.prefix"), "{e}");
    }

    #[test]
    fn a_cluster_needs_the_bucket_its_own_address_and_a_real_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        let s3 = DEFAULT_CONFIG.replacen("[cache]\n", "[cache]\nbackend = \"s3\"\nbucket = \"b\"\n", 1);
        let with = |base: &str, cluster: &str| format!("{base}\n[cluster]\nsecret_file = {secret:?}\n{cluster}\n");
        let listed = "self = \"http://10.0.0.1:5000\"\npeers = [\"http://10.0.0.2:5000\", \"http://10.0.0.1:5000\"]";
        let c = Settings::from_toml(&with(&s3, listed), "t.toml")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.owner_timeout, Duration::from_secs(1));
        let ClusterMembers::Listed(m) = &c.members else {
            panic!("listed")
        };
        assert_eq!(m.len(), 2);

        let e = err(&with(DEFAULT_CONFIG, listed));
        assert!(e.contains("cluster") && e.contains("s3"), "{e}");
        let e = err(&with(
            &s3,
            "self = \"http://10.0.0.3:5000\"\npeers = [\"http://10.0.0.2:5000\"]",
        ));
        assert!(e.contains("cluster.peers") && e.contains("own address"), "{e}");
        let e = err(&with(&s3, &format!("{listed}\npeers_dns = \"peers.svc\"")));
        assert!(e.contains("exactly one"), "{e}");
        let e = err(&with(
            &s3,
            "self = \"http://10.0.0.1:5000/path\"\npeers_dns = \"peers.svc\"",
        ));
        assert!(e.contains("cluster.self"), "{e}");
        std::fs::write(&secret, "short").unwrap();
        let e = err(&with(&s3, listed));
        assert!(e.contains("cluster.secret_file") && e.contains("16 bytes"), "{e}");

        let env = |v: &str| (v == "POD_IP").then(|| "10.1.2.3".to_string());
        assert_eq!(
            expand_env("k", "http://${POD_IP}:5000", &env).unwrap(),
            "http://10.1.2.3:5000"
        );
        let e = expand_env("cluster.self", "http://${NOPE}:5000", &env).unwrap_err();
        assert!(e.1.contains("NOPE"), "{e:?}");
    }

    #[test]
    fn default_config_is_valid() {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.upstreams.len(), 3);
        assert_eq!(s.upstreams[s.default_upstream()].name, "docker.io");
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        assert!(
            !s.tls_names()
                .iter()
                .any(|n| "auth.docker.io".ends_with(&format!(".{n}"))),
            "the default CA does not admit Docker Hub's auth server: {:?}",
            s.tls_names()
        );
        let parent = DEFAULT_CONFIG.replace(
            r#"hosts = ["registry-1.docker.io", "index.docker.io"]"#,
            r#"hosts = ["registry-1.docker.io", "docker.io"]"#,
        );
        let w = Settings::from_toml(&parent, "t").unwrap().warnings();
        assert!(w.len() == 1 && w[0].contains("auth.docker.io"), "{w:?}");
        assert!(s.upstreams[0].library_prefix && !s.upstreams[1].library_prefix);
        assert_eq!(s.max_size, 50 << 30);
        assert!(s.tls_names().contains(&"regmirror.local".to_string()));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let text = DEFAULT_CONFIG.replace("[cache]", "[cache]\nmax_sise = 1");
        let e = err(&text);
        assert!(e.contains("max_sise"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("namespace = \"quay\"", "namespace = \"quay\"\nusername2 = \"x\""));
        assert!(e.contains("username2"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = err(&DEFAULT_CONFIG.replace("\"0.0.0.0:443\"", "\"nope\""));
        assert!(e.contains("server.https") && e.contains("nope"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("\"50GiB\"", "\"50 parsecs\""));
        assert!(e.contains("cache.max_size"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("namespace = \"ghcr\"", "namespace = \"quay\""));
        assert!(
            e.contains("upstream[2].namespace") && e.contains("two upstreams"),
            "{e}"
        );
        let e = err(&DEFAULT_CONFIG.replace("hosts = [\"ghcr.io\"]", "hosts = [\"quay.io\"]"));
        assert!(e.contains("upstream[2].hosts"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("url = \"https://ghcr.io\"", "url = \"ftp://ghcr.io\""));
        assert!(e.contains("upstream[1].url"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("# username = \"...\"", "username = \"bob\""));
        assert!(e.contains("upstream[0].password_file"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("# ca_file = \"extra-roots.pem\"", "ca_file = \"/nonexistent.pem\""));
        assert!(
            e.contains("upstream[0].ca_file") && e.contains("/nonexistent.pem"),
            "{e}"
        );
    }

    #[test]
    fn urls_replace_url_and_retries_are_bounded() {
        let one = Settings::load(None).unwrap();
        assert_eq!(one.upstreams[1].urls.len(), 1, "`url` is a one-element list");
        assert_eq!(
            (one.upstreams[1].retries, one.upstreams[1].retry_delay),
            (2, Duration::from_secs(1))
        );
        let two = DEFAULT_CONFIG.replace(
            "url = \"https://ghcr.io\"",
            "urls = [\"https://mirror.example\", \"https://ghcr.io\"]\nretries = 0\nretry_delay = \"250ms\"",
        );
        let s = Settings::from_toml(&two, "t").unwrap();
        let u = &s.upstreams[1];
        assert_eq!(
            u.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            ["https://mirror.example/", "https://ghcr.io/"]
        );
        assert_eq!((u.retries, u.retry_delay), (0, Duration::from_millis(250)));
        let both = DEFAULT_CONFIG.replace(
            "url = \"https://ghcr.io\"",
            "url = \"https://ghcr.io\"\nurls = [\"https://ghcr.io\"]",
        );
        let e = err(&both);
        assert!(e.contains("upstream[1].urls") && e.contains("\"ghcr.io\""), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("url = \"https://ghcr.io\"", "urls = []"));
        assert!(e.contains("upstream[1].urls"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace(
            "url = \"https://ghcr.io\"",
            "urls = [\"https://a.example\", \"ftp://b\"]",
        ));
        assert!(e.contains("upstream[1].urls[1]"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("url = \"https://ghcr.io\"", ""));
        assert!(e.contains("upstream[1].url") && e.contains("needs"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace(
            "url = \"https://ghcr.io\"",
            "url = \"https://ghcr.io\"\nretry_delay = \"5\"",
        ));
        assert!(e.contains("upstream[1].retry_delay"), "{e}");
        let e = err(&DEFAULT_CONFIG.replace("url = \"https://ghcr.io\"", "url = \"https://ghcr.io\"\nretries = 99"));
        assert!(e.contains("upstream[1].retries"), "{e}");
    }

    #[test]
    fn tag_policies_inherit_the_upstreams_rules_and_name_bad_patterns() {
        let with =
            |lines: &str| DEFAULT_CONFIG.replace("namespace = \"ghcr\"", &format!("namespace = \"ghcr\"\n{lines}"));
        let s = Settings::from_toml(
            &with(
                "tag_check_interval = \"60s\"\nimmutable_tags = ['^v\\d+$']\n\
                 [[upstream.tag_policy]]\nrepositories = [\"org/*\"]\ntag_check_interval = \"0s\"",
            ),
            "t",
        )
        .unwrap();
        let p = &s.upstreams[1].tag_policy;
        assert_eq!(p.rules("other/app").check_interval, Duration::from_secs(60));
        let org = p.rules("org/app");
        assert_eq!(org.check_interval, Duration::ZERO);
        assert!(
            org.is_immutable("v1"),
            "a key the table leaves out keeps the upstream's value"
        );
        assert!(Settings::load(None).unwrap().upstreams[1]
            .tag_policy
            .upstream
            .always_asks());

        let e = err(&with("immutable_tags = ['^v\\d+$', 'v(']"));
        assert!(
            e.contains("upstream[1].immutable_tags[1]") && e.contains("regular expression"),
            "{e}"
        );
        let e = err(&with(
            "[[upstream.tag_policy]]\nrepositories = [\"org/*\"]\nimmutable_tags_exclude = ['[']",
        ));
        assert!(e.contains("upstream[1].tag_policy[0].immutable_tags_exclude[0]"), "{e}");
        let e = err(&with("[[upstream.tag_policy]]\nrepositories = []"));
        assert!(e.contains("upstream[1].tag_policy[0].repositories"), "{e}");
        let e = err(&with("tag_check_interval = \"soon\""));
        assert!(e.contains("upstream[1].tag_check_interval"), "{e}");
    }

    #[test]
    fn warm_schedules_name_configured_upstreams_platforms_and_an_interval() {
        let with = |t: &str| format!("{DEFAULT_CONFIG}\n[[warm]]\n{t}\n");
        let s = Settings::from_toml(
            &with("images = [\"alpine:3\", \"ghcr.io/org/app:1\"]\nevery = \"1h\""),
            "t",
        )
        .unwrap();
        assert_eq!(s.warm[0].platforms, Platforms::Every);
        assert_eq!(s.warm[0].every, Duration::from_secs(3600));
        let e = err(&with("images = [\"alpine:3\", \"example.com/x:1\"]\nevery = \"1h\""));
        assert!(e.contains("warm[0].images[1]") && e.contains("example.com"), "{e}");
        let e = err(&with(
            "images = [\"alpine:3\"]\nplatforms = [\"amd64\"]\nevery = \"1h\"",
        ));
        assert!(e.contains("warm[0].platforms[0]"), "{e}");
        let e = err(&with("images = [\"alpine:3\"]\nevery = \"0s\""));
        assert!(e.contains("warm[0].every"), "{e}");
        let e = err(&with("images = []\nevery = \"1h\""));
        assert!(e.contains("warm[0].images"), "{e}");
    }

    #[test]
    fn webhooks_default_to_every_event_and_name_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "k3y\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let with = |t: &str| format!("{DEFAULT_CONFIG}\n[[webhook]]\n{t}\n");
        let s = Settings::from_toml(&with("url = \"https://hooks.example/in\""), "t").unwrap();
        let w = &s.webhooks[0];
        assert_eq!(w.events, crate::events::Kind::ALL.to_vec());
        assert_eq!(w.queue, DEFAULT_WEBHOOK_QUEUE);
        assert!(w.secret.is_none());
        let s = Settings::from_toml(
            &with(&format!(
                "url = \"http://127.0.0.1:9/x\"\nevents = [\"evict\", \"pull\"]\nsecret_file = {:?}\nqueue = 5",
                secret.display().to_string()
            )),
            "t",
        )
        .unwrap();
        let w = &s.webhooks[0];
        use crate::events::Kind;
        assert_eq!(w.events, vec![Kind::Pull, Kind::Evict]);
        assert_eq!(
            &*w.secret.as_ref().unwrap().0,
            b"k3y",
            "the file's newline is not part of the key"
        );
        assert!(!format!("{w:?}").contains("k3y"), "the key stays out of Debug output");
        assert_eq!(w.queue, 5);

        let e = err(&with("url = \"ftp://hooks.example/\""));
        assert!(e.contains("webhook[0].url"), "{e}");
        let e = err(&with("url = \"not a url\""));
        assert!(e.contains("webhook[0].url"), "{e}");
        let e = err(&with("url = \"https://h.example/\"\nevents = [\"pull\", \"pulled\"]"));
        assert!(e.contains("webhook[0].events[1]") && e.contains("pulled"), "{e}");
        let e = err(&with("url = \"https://h.example/\"\nevents = []"));
        assert!(e.contains("webhook[0].events"), "{e}");
        let e = err(&with(
            "url = \"https://h.example/\"\nsecret_file = \"/nonexistent/secret\"",
        ));
        assert!(
            e.contains("webhook[0].secret_file") && e.contains("/nonexistent/secret"),
            "{e}"
        );
        let e = err(&with(&format!(
            "url = \"https://h.example/\"\nsecret_file = {:?}",
            empty.display().to_string()
        )));
        assert!(e.contains("webhook[0].secret_file") && e.contains("empty"), "{e}");
        for q in ["0", "1000001"] {
            let e = err(&with(&format!("url = \"https://h.example/\"\nqueue = {q}")));
            assert!(e.contains("webhook[0].queue"), "{e}");
        }
        let e = err(&with("url = \"https://h.example/\"\nqueue = -1"));
        assert!(e.contains("queue"), "{e}");
        let e = err(&with("url = \"https://h.example/\"\nsecret = \"inline\""));
        assert!(e.contains("secret"), "unknown keys are refused: {e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("ten").is_err());
    }

    #[test]
    fn low_water_is_a_share_or_a_size_below_max_size() {
        let with = |v: &str| {
            DEFAULT_CONFIG.replace(
                "max_size = \"50GiB\"",
                &format!("max_size = \"1000B\"\nlow_water = {v}"),
            )
        };
        assert_eq!(
            Settings::load(None).unwrap().low_water,
            (50u64 << 30) / 10 * 9,
            "default 90%"
        );
        assert_eq!(Settings::from_toml(&with("\"75%\""), "t").unwrap().low_water, 750);
        assert_eq!(Settings::from_toml(&with("\"600B\""), "t").unwrap().low_water, 600);
        for bad in ["\"100%\"", "\"0%\"", "\"x%\"", "\"2000B\"", "\"lots\""] {
            let e = err(&with(bad));
            assert!(e.contains("cache.low_water"), "{bad}: {e}");
        }
    }

    #[test]
    fn limits_default_and_validate() {
        let s = Settings::load(None).unwrap();
        assert_eq!(s.limits, Limits::default(), "config.toml spells out the defaults");
        let base = &DEFAULT_CONFIG[..DEFAULT_CONFIG.find("[limits]").unwrap()];
        assert_eq!(Settings::from_toml(base, "t").unwrap().limits, Limits::default());
        let text = format!(
            "{base}\n[limits]\nmax_connections = 100\nmax_connections_per_client = 10\n\
             handshake_timeout = \"500ms\"\nidle_timeout = \"2m\"\nmemory_budget = \"16MiB\"\n\
             h2_max_streams = 8\ndownload_concurrency = 4\n"
        );
        let l = Settings::from_toml(&text, "t").unwrap().limits;
        assert_eq!(l.max_connections, 100);
        assert_eq!(l.max_connections_per_client, 10);
        assert_eq!(l.handshake_timeout, Duration::from_millis(500));
        assert_eq!(l.first_request_timeout, Limits::default().first_request_timeout);
        assert_eq!(l.idle_timeout, Duration::from_secs(120));
        assert_eq!(l.memory_budget, 16 << 20);
        assert_eq!((l.h2_max_streams, l.download_concurrency), (8, 4));
        // A small max_connections pulls the per-client default down with it.
        let small = format!("{base}\n[limits]\nmax_connections = 10\n");
        assert_eq!(
            Settings::from_toml(&small, "t")
                .unwrap()
                .limits
                .max_connections_per_client,
            10
        );

        let limits = |body: &str| err(&format!("{base}\n[limits]\n{body}\n"));
        for (body, key) in [
            ("idle_timeout = \"10\"", "limits.idle_timeout"),
            ("idle_timeout = \"0s\"", "limits.idle_timeout"),
            ("handshake_timeout = \"ten seconds\"", "limits.handshake_timeout"),
            (
                "first_request_timeout = \"3 fortnights\"",
                "limits.first_request_timeout",
            ),
            ("max_connections = 0", "limits.max_connections"),
            (
                "max_connections = 5\nmax_connections_per_client = 6",
                "limits.max_connections_per_client",
            ),
            ("h2_max_streams = 0", "limits.h2_max_streams"),
            ("memory_budget = \"lots\"", "limits.memory_budget"),
            ("memory_budget = \"4KiB\"", "limits.memory_budget"),
            ("download_concurrency = 0", "limits.download_concurrency"),
            ("idle_timout = \"1s\"", "idle_timout"),
        ] {
            let e = limits(body);
            assert!(e.contains(key), "{body}: {e}");
        }
        let e = limits("idle_timeout = 10");
        assert!(e.contains("idle_timeout"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("0ms").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn resolver_overrides_must_be_ips() {
        let text = format!("{DEFAULT_CONFIG}\n[resolver]\noverrides = {{ \"up.test\" = \"127.0.0.9\" }}\n");
        let s = Settings::from_toml(&text, "t").unwrap();
        assert_eq!(s.resolver_overrides["up.test"].to_string(), "127.0.0.9");
        let bad = format!("{DEFAULT_CONFIG}\n[resolver]\noverrides = {{ \"up.test\" = \"host\" }}\n");
        assert!(err(&bad).contains("resolver.overrides"));
    }
}
