//! Turns an HTTP request line into a typed registry request.
//!
//! Pure: no I/O, no state. Picks the upstream by (in order) containerd's
//! `?ns=`, a Host that names a mirrored registry (transparent mode), the
//! first path segment naming an upstream namespace (explicit prefix and
//! podman mirrors), and otherwise the default upstream (docker's
//! `registry-mirrors`). Everything a client names is validated here, before
//! any other module sees it.

use crate::config::Settings;
use crate::reference::{Digest, Reference, RepoName};

/// Which upstream a request is for: the upstream's place in configuration
/// order, so routing needs nothing of the upstreams but their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(usize);

impl UpstreamId {
    /// The id of the `i`th upstream in configuration order, for tables built
    /// from that same configuration (routing, the upstream table, tests).
    pub fn from_config_index(i: usize) -> Self {
        UpstreamId(i)
    }

    pub fn index(self) -> usize {
        self.0
    }
}

/// What the routing table needs to know of one upstream.
#[derive(Debug, Clone)]
pub struct RouteUpstream {
    pub name: String,
    pub hosts: Vec<String>,
    pub namespace: String,
    pub library_prefix: bool,
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    pub upstreams: Vec<RouteUpstream>,
    pub default_upstream: usize,
    /// The `[[local]]` namespaces, in config order.
    pub locals: Vec<String>,
}

impl RouteTable {
    pub fn from_settings(s: &Settings) -> Self {
        RouteTable {
            upstreams: s
                .upstreams
                .iter()
                .map(|u| RouteUpstream {
                    name: u.name.clone(),
                    hosts: u.hosts.clone(),
                    namespace: u.namespace.clone(),
                    library_prefix: u.library_prefix,
                })
                .collect(),
            default_upstream: s.default_upstream(),
            locals: s.locals.iter().map(|l| l.namespace.clone()).collect(),
        }
    }

    /// True when `host` is one of the intercepted upstream hostnames.
    pub fn knows_host(&self, host: &str) -> bool {
        self.by_host(host).is_some()
    }

    /// The upstream containerd's `ns=` names.
    pub fn upstream_for_ns(&self, ns: &str) -> Option<UpstreamId> {
        self.by_ns(ns).map(UpstreamId::from_config_index)
    }

    /// The upstream of requests that name none (docker's `registry-mirrors`).
    pub fn default_upstream(&self) -> UpstreamId {
        UpstreamId::from_config_index(self.default_upstream)
    }

    /// The upstream an intercepted hostname belongs to.
    pub fn upstream_for_host(&self, host: &str) -> Option<UpstreamId> {
        self.by_host(host).map(UpstreamId::from_config_index)
    }

    fn by_host(&self, host: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.hosts.iter().any(|h| h == host))
    }

    fn by_ns(&self, ns: &str) -> Option<usize> {
        let ns = ns.to_ascii_lowercase();
        self.upstreams
            .iter()
            .position(|u| u.name == ns || u.hosts.contains(&ns))
    }

    fn by_namespace(&self, segment: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.namespace == segment)
    }
}

/// How the client addressed the upstream; decides how names look to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Transparent,
    Namespace,
    Prefix,
    DefaultMirror,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Manifest(Reference),
    Blob(Digest),
    TagsList,
    /// `blobs/uploads/` (`None`: start a session) or one session. Only
    /// local namespaces take pushes; the mirrors are read-only.
    Upload(Option<UploadId>),
    /// `referrers/<digest>` (OCI 1.1).
    Referrers(Digest),
}

/// An upload session's id as it appears in its URL: regmirror makes them
/// (hex), so anything else names no session; validated before it is
/// looked up or names a file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId(String);

impl UploadId {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(UploadId(s.to_string()))
        } else {
            Err(format!("{s:?} is not an upload session id"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UploadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A request for a repository regmirror hosts itself (`[[local]]`).
#[derive(Debug, Clone)]
pub struct LocalRequest {
    /// Index into `RouteTable::locals` (and `Settings::locals`).
    pub namespace: usize,
    /// The whole name, namespace first (`private/team/app`).
    pub repo: RepoName,
    pub kind: Kind,
    /// `n` and `last` of a tag list, validated.
    pub page: Option<(Option<u32>, Option<crate::reference::Tag>)>,
}

#[derive(Debug, Clone)]
pub struct RepoRequest {
    pub upstream: UpstreamId,
    pub mode: Mode,
    /// The name as the client wrote it (with the namespace prefix, if any).
    pub client_repo: String,
    /// The name upstream knows it by.
    pub repo: RepoName,
    pub kind: Kind,
    /// The pagination of a tag list (`n`, `last`), validated and in one
    /// canonical order; every other query parameter is dropped, never
    /// forwarded.
    pub forward_query: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `GET /v2/`
    Ping,
    /// `GET /v2/_catalog`: one upstream's repositories, or all (namespaced).
    Catalog {
        upstream: Option<UpstreamId>,
    },
    Repo(RepoRequest),
    /// A repository of a local namespace: the private registry.
    Local(LocalRequest),
    Health,
    /// `/readyz`: the store takes writes, the CA is loaded, listeners bound.
    Ready,
    Metrics,
    /// `/token`: regmirror's token endpoint (the realm of its challenges).
    Token,
    /// `/ca.crt`: the root CA's certificate, for client setup.
    CaCert,
    /// `/hostnames`: the names clients point at regmirror, for client setup.
    Hostnames,
    /// `/`: the status page (plain listener only).
    StatusPage,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Not a registry API path at all.
    NotFound(String),
    NameInvalid(String),
    DigestInvalid(String),
    TagInvalid(String),
    PaginationInvalid(String),
    UnknownNamespace(String),
    /// An upload URL whose session id regmirror never made.
    UploadUnknown(String),
}

/// The most tags one page may ask for (distribution's own default limit is 1000).
pub const MAX_PAGE: u32 = 10_000;

/// Routes a request. `host` is the Host header (or `:authority`, or the TLS
/// SNI when neither is present) without its port.
pub fn route(table: &RouteTable, host: Option<&str>, path: &str, query: Option<&str>) -> Result<Endpoint, RouteError> {
    if path == "/healthz" {
        return Ok(Endpoint::Health);
    }
    if path == "/readyz" {
        return Ok(Endpoint::Ready);
    }
    if path == "/token" {
        return Ok(Endpoint::Token);
    }
    if path == "/ca.crt" {
        return Ok(Endpoint::CaCert);
    }
    if path == "/hostnames" {
        return Ok(Endpoint::Hostnames);
    }
    if path == "/metrics" {
        return Ok(Endpoint::Metrics);
    }
    if path == "/" {
        return Ok(Endpoint::StatusPage);
    }
    if path.contains('%') || path.contains("//") || path.contains("/./") || path.contains("/../") {
        return Err(RouteError::NotFound(format!("malformed path {path:?}")));
    }
    let Some(rest) = path
        .strip_prefix("/v2/")
        .or(if path == "/v2" { Some("") } else { None })
    else {
        return Err(RouteError::NotFound(format!("{path:?} is not a registry API path")));
    };

    let mut ns = None;
    let mut page_size = None;
    let mut last = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "ns" => ns = Some(v.into_owned()),
            "n" => page_size = Some(v.into_owned()),
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    let host = host.map(|h| h.to_ascii_lowercase());
    let from_ns = match &ns {
        Some(n) => Some(
            table
                .by_ns(n)
                .ok_or_else(|| RouteError::UnknownNamespace(format!("no upstream is configured for ns={n:?}")))?,
        ),
        None => None,
    };
    let from_host = host.as_deref().and_then(|h| table.by_host(h));

    if rest.is_empty() {
        return Ok(Endpoint::Ping);
    }
    if rest == "_catalog" {
        return Ok(Endpoint::Catalog {
            upstream: from_ns.or(from_host).map(UpstreamId::from_config_index),
        });
    }

    let (name, kind) = split_kind(rest)?;
    if from_ns.is_none() && from_host.is_none() {
        // A local namespace is followed by at least one component
        // (`private/app`); it is never an upstream's name on this host.
        let (first, tail) = name.split_once('/').unwrap_or((name, ""));
        if let Some(namespace) = table.locals.iter().position(|l| l == first) {
            if !tail.is_empty() {
                let repo = RepoName::parse(name).map_err(RouteError::NameInvalid)?;
                let page = match kind {
                    Kind::TagsList => Some(page(page_size.as_deref(), last.as_deref())?),
                    _ => None,
                };
                return Ok(Endpoint::Local(LocalRequest {
                    namespace,
                    repo,
                    kind,
                    page,
                }));
            }
        }
    }
    let (upstream, mode, upstream_name) = if let Some(u) = from_ns {
        (u, Mode::Namespace, name)
    } else if let Some(u) = from_host {
        (u, Mode::Transparent, name)
    } else {
        // A namespace prefix is followed by a whole upstream name of at
        // least two components (`dockerhub/library/x`, `quay/org/x`). Two
        // components alone are a Docker Hub name as docker's
        // `registry-mirrors` sends it (`quay/tool` is the Hub user `quay`),
        // so the two modes never read the same path differently.
        let (first, tail) = name.split_once('/').unwrap_or((name, ""));
        match table.by_namespace(first) {
            Some(u) if tail.contains('/') => (u, Mode::Prefix, tail),
            _ => (table.default_upstream, Mode::DefaultMirror, name),
        }
    };
    let client_repo = RepoName::parse(name).map_err(RouteError::NameInvalid)?;
    let mut repo = RepoName::parse(upstream_name).map_err(RouteError::NameInvalid)?;
    if table.upstreams[upstream].library_prefix {
        repo = repo.with_library_prefix();
    }
    let forward_query = match kind {
        Kind::TagsList => pagination(page_size.as_deref(), last.as_deref())?,
        _ => None,
    };
    Ok(Endpoint::Repo(RepoRequest {
        upstream: UpstreamId::from_config_index(upstream),
        mode,
        client_repo: client_repo.as_str().to_string(),
        repo,
        kind,
        forward_query,
    }))
}

/// `n` and `last` of a tag list, checked and in canonical form.
/// A tag list's `n` and `last`, validated.
fn page(n: Option<&str>, last: Option<&str>) -> Result<(Option<u32>, Option<crate::reference::Tag>), RouteError> {
    let n = match n {
        None => None,
        Some(n) => {
            let valid = n.len() <= 6 && n.bytes().all(|c| c.is_ascii_digit());
            match n.parse::<u32>() {
                Ok(v) if valid && v <= MAX_PAGE => Some(v),
                _ => {
                    return Err(RouteError::PaginationInvalid(format!(
                        "n={n:?} is not a page size from 0 to {MAX_PAGE}"
                    )))
                }
            }
        }
    };
    let last = match last {
        None => None,
        Some(l) => Some(crate::reference::Tag::parse(l).map_err(RouteError::TagInvalid)?),
    };
    Ok((n, last))
}

fn pagination(n: Option<&str>, last: Option<&str>) -> Result<Option<String>, RouteError> {
    let (n, last) = page(n, last)?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    if let Some(n) = n {
        q.append_pair("n", &n.to_string());
    }
    if let Some(last) = last {
        q.append_pair("last", last.as_str());
    }
    let q = q.finish();
    Ok(if q.is_empty() { None } else { Some(q) })
}

/// Splits `<name>/manifests/<ref>` and friends. The name is everything before
/// the last `/manifests/`, `/blobs/` or `/tags/list`.
fn split_kind(rest: &str) -> Result<(&str, Kind), RouteError> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, Kind::TagsList));
    }
    if let Some(i) = rest.rfind("/blobs/uploads") {
        let session = rest[i + "/blobs/uploads".len()..].trim_start_matches('/');
        let id = if session.is_empty() {
            None
        } else {
            Some(UploadId::parse(session).map_err(RouteError::UploadUnknown)?)
        };
        return Ok((&rest[..i], Kind::Upload(id)));
    }
    if let Some(i) = rest.rfind("/referrers/") {
        let d = Digest::parse(&rest[i + "/referrers/".len()..]).map_err(RouteError::DigestInvalid)?;
        return Ok((&rest[..i], Kind::Referrers(d)));
    }
    if let Some(i) = rest.rfind("/manifests/") {
        let r = &rest[i + "/manifests/".len()..];
        let reference = Reference::parse(r).map_err(|e| {
            if r.contains(':') {
                RouteError::DigestInvalid(e)
            } else {
                RouteError::TagInvalid(e)
            }
        })?;
        return Ok((&rest[..i], Kind::Manifest(reference)));
    }
    if let Some(i) = rest.rfind("/blobs/") {
        let d = Digest::parse(&rest[i + "/blobs/".len()..]).map_err(RouteError::DigestInvalid)?;
        return Ok((&rest[..i], Kind::Blob(d)));
    }
    Err(RouteError::NotFound(format!("/v2/{rest} is not a registry API path")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::from_settings(&Settings::load(None).unwrap())
    }

    fn repo(host: Option<&str>, path: &str, query: Option<&str>) -> RepoRequest {
        match route(&table(), host, path, query) {
            Ok(Endpoint::Repo(r)) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    fn id(i: usize) -> UpstreamId {
        UpstreamId::from_config_index(i)
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn transparent_mode_picks_upstream_by_host() {
        let r = repo(
            Some("registry-1.docker.io"),
            "/v2/library/debian/manifests/bookworm",
            None,
        );
        assert_eq!(
            (r.upstream, r.mode, r.repo.as_str()),
            (id(0), Mode::Transparent, "library/debian")
        );
        assert!(matches!(r.kind, Kind::Manifest(Reference::Tag(_))));
        let r = repo(Some("ghcr.io"), &format!("/v2/org/app/blobs/{D}"), None);
        assert_eq!((r.upstream, r.repo.as_str()), (id(1), "org/app"));
        assert!(matches!(r.kind, Kind::Blob(_)));
        let r = repo(Some("quay.io"), "/v2/prometheus/node-exporter/tags/list", Some("n=10"));
        assert_eq!(
            (r.upstream, r.kind.clone(), r.forward_query.as_deref()),
            (id(2), Kind::TagsList, Some("n=10"))
        );
    }

    #[test]
    fn docker_hub_single_component_names_get_library() {
        let r = repo(Some("docker.io"), "/v2/alpine/manifests/3", None);
        assert_eq!(r.repo.as_str(), "library/alpine");
        assert_eq!(r.client_repo, "alpine");
        let r = repo(Some("ghcr.io"), "/v2/alpine/manifests/3", None);
        assert_eq!(r.repo.as_str(), "alpine", "only Docker Hub has library/");
    }

    #[test]
    fn explicit_prefix_and_podman_mirror_paths() {
        let r = repo(Some("regmirror.local"), "/v2/dockerhub/library/nginx/manifests/1", None);
        assert_eq!(
            (r.upstream, r.mode, r.repo.as_str()),
            (id(0), Mode::Prefix, "library/nginx")
        );
        assert_eq!(r.client_repo, "dockerhub/library/nginx");
        let r = repo(Some("10.0.0.5"), "/v2/quay/org/x/manifests/1", None);
        assert_eq!((r.upstream, r.repo.as_str()), (id(2), "org/x"));
        let r = repo(None, "/v2/dockerhub/library/nginx/manifests/1", None);
        assert_eq!(r.repo.as_str(), "library/nginx");
    }

    #[test]
    fn registry_mirrors_requests_go_to_docker_hub() {
        let r = repo(Some("10.0.0.5"), "/v2/library/nginx/manifests/1", None);
        assert_eq!(
            (r.upstream, r.mode, r.repo.as_str()),
            (id(0), Mode::DefaultMirror, "library/nginx")
        );
        let r = repo(Some("10.0.0.5"), "/v2/quay/manifests/1", None);
        assert_eq!(
            (r.upstream, r.repo.as_str()),
            (id(0), "library/quay"),
            "a namespace alone is a Docker Hub name"
        );
        for hub_name in ["quay/tool", "ghcr/app", "dockerhub/nginx"] {
            let r = repo(Some("10.0.0.5"), &format!("/v2/{hub_name}/manifests/1"), None);
            assert_eq!(
                (r.upstream, r.mode, r.repo.as_str()),
                (id(0), Mode::DefaultMirror, hub_name),
                "a Docker Hub user named like a namespace is not misrouted"
            );
        }
    }

    #[test]
    fn containerd_ns_picks_upstream_and_is_stripped() {
        let r = repo(Some("10.0.0.5"), "/v2/org/app/manifests/1", Some("ns=ghcr.io"));
        assert_eq!(
            (r.upstream, r.mode, r.repo.as_str()),
            (id(1), Mode::Namespace, "org/app")
        );
        assert_eq!(r.forward_query, None);
        let r = repo(Some("10.0.0.5"), "/v2/library/x/tags/list", Some("ns=docker.io&n=5"));
        assert_eq!((r.upstream, r.forward_query.as_deref()), (id(0), Some("n=5")));
    }

    #[test]
    fn tag_list_queries_keep_only_validated_pagination() {
        let r = repo(
            Some("docker.io"),
            "/v2/library/x/tags/list",
            Some("last=1.2&evil=x&n=007&ns=docker.io"),
        );
        assert_eq!(
            r.forward_query.as_deref(),
            Some("n=7&last=1.2"),
            "canonical, nothing else forwarded"
        );
        let r = repo(Some("docker.io"), "/v2/library/x/manifests/1", Some("n=5&x=y"));
        assert_eq!(r.forward_query, None, "only tag lists take a query");
        for bad in ["n=-1", "n=abc", "n=99999999999", "n=10001", "last=../x", "last=-bad"] {
            assert!(
                route(&table(), Some("docker.io"), "/v2/library/x/tags/list", Some(bad)).is_err(),
                "{bad}"
            );
        }
        let e = route(&table(), None, "/v2/x/manifests/1", Some("ns=evil.example")).unwrap_err();
        assert!(matches!(e, RouteError::UnknownNamespace(_)));
    }

    #[test]
    fn ping_catalog_and_operational_paths() {
        assert!(matches!(route(&table(), None, "/v2/", None), Ok(Endpoint::Ping)));
        assert!(matches!(route(&table(), None, "/v2", None), Ok(Endpoint::Ping)));
        assert!(matches!(
            route(&table(), Some("quay.io"), "/v2/_catalog", None),
            Ok(Endpoint::Catalog { upstream: Some(u) }) if u == id(2)
        ));
        assert!(matches!(
            route(&table(), None, "/v2/_catalog", None),
            Ok(Endpoint::Catalog { upstream: None })
        ));
        assert!(matches!(route(&table(), None, "/healthz", None), Ok(Endpoint::Health)));
    }

    #[test]
    fn malformed_input_is_rejected_before_it_reaches_anything() {
        let t = table();
        let bad = [
            ("/v2/../etc/passwd/manifests/1", "traversal"),
            ("/v2/library/x/blobs/sha256:zz", "bad digest"),
            ("/v2/library/x/blobs/sha256:../../etc", "digest traversal"),
            ("/v2/Library/x/manifests/1", "uppercase name"),
            ("/v2/library/x/manifests/-bad", "bad tag"),
            ("/v2/library%2fx/manifests/1", "encoded"),
            ("/v2/library/x/nothing", "unknown endpoint"),
            ("/etc/passwd", "not /v2"),
            ("/v2//x/manifests/1", "empty component"),
        ];
        for (p, why) in bad {
            assert!(route(&t, Some("docker.io"), p, None).is_err(), "{why}: {p}");
        }
        assert!(matches!(
            route(&t, Some("docker.io"), "/v2/library/x/blobs/sha256:00", None),
            Err(RouteError::DigestInvalid(_))
        ));
    }

    #[test]
    fn uploads_are_recognised() {
        let r = repo(Some("docker.io"), "/v2/library/x/blobs/uploads/", None);
        assert_eq!(r.kind, Kind::Upload(None));
    }
}
