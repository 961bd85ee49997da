//! The registry API as clients see it: one request in, one response out.
//!
//! `handle` reads top to bottom as the phases of a request: loop check →
//! route → method check → the endpoint's handler (manifests, blobs, tags,
//! catalog) → common headers → one log line. Handlers return
//! `Result<Response, RegistryError>`; `errors` turns failures into OCI error
//! bodies in exactly one place.

pub mod blobs;
pub mod body;
pub mod catalog;
pub mod errors;
pub mod manifests;
pub mod outcome;
pub mod owner;
pub mod range;
pub mod tag_asks;
pub mod tags;
pub mod token;

use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::auth::challenge::{self, Origin};
use crate::auth::scope::Scope;
use crate::auth::{self, Access, Auth};
use crate::cache::{Cache, RepoKey};
use crate::config::Settings;
use crate::metrics::METRICS;
use crate::reference::Reference;
use crate::route::{route, Endpoint, Kind, RepoRequest, RouteTable};
use crate::upstream::client::VIA_HEADER;
use crate::upstream::{AuthScheme, Upstream, UpstreamTable};
use body::{empty, full, Body};
use errors::RegistryError;

/// The most request-line and header bytes regmirror accepts; registry
/// clients send a few KiB at most (a Bearer token is the largest part).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Everything a request handler needs; shared by all connections.
pub struct App {
    pub settings: Settings,
    pub routes: RouteTable,
    pub upstreams: UpstreamTable,
    pub cache: Arc<Cache>,
    pub auth: Auth,
    /// The root CA's certificate (PEM), served at `/ca.crt`. Only the
    /// certificate: the key is never loaded into anything a route reads.
    pub ca_pem: String,
    /// This process's loop-detection token (see `VIA_HEADER`).
    pub via: String,
    /// Upload sessions and usage of the local namespaces.
    pub hosted: crate::local::Hosted,
    /// What the `[[warm]]` schedules did last.
    pub warming: crate::warm::runs::WarmRuns,
    /// Tag questions upstream is being asked now, shared by anonymous requests.
    pub tag_asks: tag_asks::TagAsks,
    /// The other replicas on the bucket (`[cluster]`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// What the listener knows of the connection a request came on.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub sni: Option<String>,
    pub tls: bool,
    pub peer: Option<std::net::SocketAddr>,
    pub listener: Listener,
}

/// Which listener a connection came through, for the request log and
/// metrics: the same request may arrive by any of them, and an operator
/// reading the log needs to know which setup a client used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Listener {
    #[default]
    Plain,
    Tls,
    /// Inside a tunnel opened on the CONNECT proxy listener.
    Connect,
    /// Sent by a `[[warm]]` schedule from inside the server.
    Warm,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Plain => "plain",
            Listener::Tls => "tls",
            Listener::Connect => "connect",
            Listener::Warm => "warm",
        }
    }
}

impl App {
    pub fn upstream(&self, r: &RepoRequest) -> &Upstream {
        self.upstreams.get(r.upstream)
    }

    /// Where the cache keeps what it learns of `r`'s repository.
    pub fn repo_key<'a>(&'a self, r: &'a RepoRequest) -> RepoKey<'a> {
        RepoKey {
            upstream: self.upstream(r).name(),
            repo: &r.repo,
        }
    }
}

pub async fn handle<B>(app: Arc<App>, conn: ConnInfo, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host = request_host(&req, &conn);
    let mut info = outcome::RequestInfo {
        listener: conn.listener.as_str(),
        ..Default::default()
    };
    // Boxed: the handlers' state machines (the upstream paths' above all)
    // make this future several KiB, and hyper moves the request's future
    // into a task of its own for every HTTP/2 stream.
    let result = Box::pin(dispatch(&app, &conn, host.as_deref(), req, &mut info)).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let upstream = info.upstream.as_deref().unwrap_or("-");
            let repo = info.repo.as_deref().unwrap_or("-");
            let host = host.as_deref().unwrap_or("-");
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, host, upstream, repo, error = %e, "request failed");
            } else {
                tracing::info!(%method, %path, host, upstream, repo, error = %e, "request rejected");
            }
            e.into_response()
        }
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if method == Method::HEAD {
        *resp.body_mut() = empty();
    }
    outcome::finish(&info, &method, &path, host.as_deref(), started, resp)
}

/// What the client wrote as the host: Host header, `:authority` (HTTP/2),
/// or the TLS SNI, port included.
fn raw_authority<B>(req: &Request<B>, conn: &ConnInfo) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .or_else(|| conn.sni.clone())
}

/// The hostname the client addressed, without a port.
fn request_host<B>(req: &Request<B>, conn: &ConnInfo) -> Option<String> {
    let raw = raw_authority(req, conn)?;
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]")).unwrap_or(raw.clone())
    } else {
        raw.split(':').next().unwrap_or("").to_string()
    };
    Some(host.to_ascii_lowercase())
}

/// The Host the client sent, port included, for realms that must point
/// back at it; the proxy's own name when it holds anything unexpected.
fn request_authority<B>(req: &Request<B>, conn: &ConnInfo, server_name: &str) -> String {
    let raw = raw_authority(req, conn).unwrap_or_default();
    let plain = !raw.is_empty()
        && raw.len() <= 255
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if plain {
        raw.to_ascii_lowercase()
    } else {
        server_name.to_string()
    }
}

/// containerd's `?ns=`, when present.
fn ns_param(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

/// A request signed as a replica's must verify: a client that sends the
/// header without the cluster's secret is refused, logged and counted.
fn check_peer<B>(app: &App, req: &Request<B>) -> Result<(), RegistryError> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let verified = match &app.cluster {
        Some(c) => c
            .verify(req.headers(), req.method().as_str(), path)
            .map_err(|e| e.to_string()),
        None => Err("this replica has no [cluster]".to_string()),
    };
    match verified {
        Ok(_) => Ok(()),
        Err(reason) => {
            METRICS.peer_refused.inc();
            tracing::warn!(path, reason, "refused a request signed as a replica's");
            Err(RegistryError::unauthorized(format!("peer signature refused: {reason}")))
        }
    }
}

async fn dispatch<B>(
    app: &Arc<App>,
    conn: &ConnInfo,
    host: Option<&str>,
    req: Request<B>,
    info: &mut outcome::RequestInfo,
) -> Result<Response<Body>, RegistryError>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let uri = req.uri();
    let uri_bytes = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let header_bytes: usize = uri_bytes
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(RegistryError::header_too_large(header_bytes, MAX_HEADER_BYTES));
    }
    if req.headers().get(VIA_HEADER).and_then(|v| v.to_str().ok()) == Some(app.via.as_str()) {
        return Err(RegistryError::loop_detected());
    }
    if conn.tls {
        // The handshake only succeeds for configured names; a Host header
        // naming something else on that connection is refused here.
        if let Some(h) = host {
            let known = h == app.settings.server_name || app.routes.knows_host(h);
            if !known && h.parse::<std::net::IpAddr>().is_err() {
                return Err(RegistryError::unknown_host(h));
            }
        }
        if let Some(e) = misdirected(app, conn.sni.as_deref(), host) {
            return Err(e);
        }
    }
    if req.headers().contains_key(crate::cluster::PEER_HEADER) {
        check_peer(app, &req)?;
    }
    let endpoint = route(&app.routes, host, req.uri().path(), req.uri().query())?;
    describe(app, &endpoint, host, req.uri().query(), info);
    let method = req.method().clone();
    let read_only = matches!(method, Method::GET | Method::HEAD);
    let head = method == Method::HEAD;
    let origin = Origin {
        tls: conn.tls,
        host: request_authority(&req, conn, &app.settings.server_name),
        ns: ns_param(req.uri().query()),
    };
    match endpoint {
        Endpoint::Health => Ok(text(StatusCode::OK, "ok\n", "text/plain")),
        // Serving at all means the CA loaded and the listeners are bound.
        Endpoint::Ready => match app.cache.check_writable().await {
            Ok(()) => Ok(text(StatusCode::OK, "ready\n", "text/plain")),
            Err(e) => {
                tracing::warn!(error = %e, "not ready: the store cannot be written");
                Err(RegistryError::unavailable(format!("the store cannot be written: {e}")))
            }
        },
        Endpoint::Metrics => {
            for u in app.upstreams.iter() {
                METRICS.set_url_states(u.name(), &u.url_states());
            }
            Ok(text(StatusCode::OK, METRICS.render(), crate::metrics::CONTENT_TYPE))
        }
        // One per line: the intercepted upstream hosts, then the proxy's own
        // name (what scripts/install-ca.sh puts in /etc/hosts and certs.d).
        Endpoint::Hostnames if read_only => {
            let mut names: Vec<String> = app.settings.upstreams.iter().flat_map(|u| u.hosts.clone()).collect();
            names.push(app.settings.server_name.clone());
            Ok(text(StatusCode::OK, names.join("\n") + "\n", "text/plain"))
        }
        Endpoint::CaCert if read_only => Ok(text(StatusCode::OK, app.ca_pem.clone(), "application/x-pem-file")),
        // Intercepted names answer as registries only; the page is for
        // operators on the plain listener.
        Endpoint::StatusPage if conn.tls => Err(crate::route::RouteError::NotFound("/".into()).into()),
        Endpoint::StatusPage if read_only => {
            Ok(text(StatusCode::OK, status_page(app).await, "text/html; charset=utf-8"))
        }
        Endpoint::Token if method == Method::GET || method == Method::POST => {
            let (parts, body) = req.into_parts();
            let form = if method == Method::POST {
                read_form(body).await?
            } else {
                bytes::Bytes::new()
            };
            let authorization = parts.headers.contains_key(header::AUTHORIZATION);
            let request = auth::token::TokenRequest::parse(&method, parts.uri.query(), authorization, &form);
            if crate::local::token::is_local(app, &request) {
                return crate::local::token::serve(app, &request, &parts.headers).await;
            }
            token::serve(app, host, &method, parts.uri.query(), &parts.headers, form).await
        }
        Endpoint::Local(r) => {
            use http_body_util::BodyExt;
            let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
            crate::local::serve(app, &origin, r, req).await
        }
        _ if !read_only => Err(RegistryError::unsupported(format!(
            "{method} is not supported: regmirror is a read-only pull-through cache"
        ))),
        Endpoint::Token => Err(RegistryError::unsupported("HEAD /token")),
        Endpoint::CaCert | Endpoint::Hostnames | Endpoint::StatusPage => Err(RegistryError::unsupported("only GET")),
        Endpoint::Ping
            if app.auth.local.is_some() && !host.is_some_and(|h| app.routes.knows_host(h)) && origin.ns.is_none() =>
        {
            local_ping(app, &origin, req.headers()).await
        }
        Endpoint::Ping => ping(app, host, &origin, req.headers()).await,
        Endpoint::Catalog { upstream } => {
            let identity = app.auth.identity_of(req.headers());
            catalog::list(app, upstream, req.uri().query(), &identity).await
        }
        Endpoint::Repo(r) => {
            let upstream = app.upstream(&r);
            if let Some(allowed) = &upstream.config.repositories {
                if !allowed.iter().any(|p| p.matches(r.repo.as_str())) {
                    return Err(RegistryError::not_allowed(&r.client_repo));
                }
            }
            // No span per request: its fields were formatted for every
            // request, and the few lines logged inside name the upstream
            // and repository themselves.
            let work = async {
                // The one place a request's credential is read: handlers get
                // the decided identity.
                let identity = app.auth.identify(upstream, req.headers()).await?;
                let access = Access::new(&app.auth, identity, upstream, &r.repo);
                match &r.kind {
                    Kind::Manifest(reference) => {
                        manifests::serve(app, &r, reference, req.headers(), head, &access).await
                    }
                    Kind::Blob(digest) => blobs::serve(app, &r, digest, req.headers(), head, &access).await,
                    Kind::TagsList => tags::list(app, &r, head, &access).await,
                    Kind::Upload(_) => Err(RegistryError::unsupported(
                        "pushing is not supported: regmirror is a read-only pull-through cache",
                    )),
                    Kind::Referrers(_) => Err(RegistryError::new(
                        StatusCode::NOT_FOUND,
                        errors::OciCode::NotFound,
                        "the referrers API is served for local namespaces only",
                    )),
                }
            };
            let scope = Scope::pull(&r.client_repo);
            work.await
                .map_err(|e| with_challenge(e, upstream, &origin, Some(&scope)))
        }
    }
}

/// The status page, rendered now. The cache listing failing leaves the
/// rest of the page standing (and says so in the log).
async fn status_page(app: &App) -> String {
    let upstreams: Vec<String> = app.settings.upstreams.iter().map(|u| u.name.clone()).collect();
    let cached = app.cache.cached_tags(&upstreams).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "status page: could not list the cache");
        Vec::new()
    });
    crate::status_page::render(&crate::status_page::StatusData {
        upstreams,
        cached,
        recent: outcome::recent_pulls(),
        health: crate::upstream::observed::snapshot(),
        urls: app
            .upstreams
            .iter()
            .map(|u| (u.name().to_string(), u.url_states()))
            .collect(),
        local: crate::local::summary(app).await,
        warm: app.warming.snapshot(),
        now: std::time::SystemTime::now(),
    })
}

/// What the request log and metrics say of a routed request.
fn describe(app: &App, endpoint: &Endpoint, host: Option<&str>, query: Option<&str>, info: &mut outcome::RequestInfo) {
    info.kind = match endpoint {
        Endpoint::Ping => {
            let id = ping_upstream(app, host, ns_param(query).as_deref());
            info.upstream = Some(app.upstreams.get(id).name().to_string());
            "ping"
        }
        Endpoint::Token => "token",
        Endpoint::Catalog { upstream } => {
            info.upstream = upstream.map(|id| app.upstreams.get(id).name().to_string());
            "list"
        }
        Endpoint::Local(r) => {
            info.upstream = app
                .settings
                .locals
                .get(r.namespace)
                .map(|l| format!("local:{}", l.namespace));
            info.repo = Some(r.repo.to_string());
            match &r.kind {
                Kind::Manifest(reference) => {
                    info.reference = Some(reference.to_string());
                    "manifest"
                }
                Kind::Blob(d) => {
                    info.reference = Some(d.to_string());
                    "blob"
                }
                Kind::TagsList => "list",
                Kind::Upload(_) => "upload",
                Kind::Referrers(_) => "referrers",
            }
        }
        Endpoint::Repo(r) => {
            info.upstream = Some(app.upstream(r).name().to_string());
            info.repo = Some(r.repo.to_string());
            match &r.kind {
                Kind::Manifest(reference) => {
                    info.reference = Some(reference.to_string());
                    match reference {
                        Reference::Tag(_) => "tag",
                        Reference::Digest(_) => "manifest",
                    }
                }
                Kind::Blob(d) => {
                    info.reference = Some(d.to_string());
                    "blob"
                }
                Kind::TagsList => "list",
                Kind::Upload(_) | Kind::Referrers(_) => "other",
            }
        }
        _ => "other",
    };
}

/// `/v2/`: the challenge upstream would give, so clients log in here; 200
/// when the client brings a token, or upstream is open (or unreachable so
/// far: anything public and cached is still served without a token).
async fn ping(
    app: &Arc<App>,
    host: Option<&str>,
    origin: &Origin,
    headers: &HeaderMap,
) -> Result<Response<Body>, RegistryError> {
    let upstream = app.upstreams.get(ping_upstream(app, host, origin.ns.as_deref()));
    let scheme = upstream.client.discover_auth().await;
    let challenges = matches!(scheme, AuthScheme::Challenges(_));
    if !challenges || headers.contains_key(header::AUTHORIZATION) {
        return Ok(text(StatusCode::OK, "{}", "application/json"));
    }
    Err(with_challenge(
        RegistryError::unauthorized("authentication required"),
        upstream,
        origin,
        None,
    ))
}

/// `/v2/` on the proxy's own name or the plain listener when local
/// namespaces exist: the challenge of regmirror's own `/token`, so
/// `docker login` checks the password, and 200 for a client that brings a
/// token (any: a pull through the mirror brings upstream's).
async fn local_ping(app: &App, origin: &Origin, headers: &HeaderMap) -> Result<Response<Body>, RegistryError> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let local = app.auth.local.as_ref();
        let basic = v.starts_with("Basic ") || v.starts_with("basic ");
        if !basic {
            return Ok(text(StatusCode::OK, "{}", "application/json"));
        }
        if let Some(auth) = local {
            // Basic on the ping (podman's login does this first): checked
            // against any namespace that lists the user.
            if auth.caller_any(headers).await {
                return Ok(text(StatusCode::OK, "{}", "application/json"));
            }
        }
    }
    let mut e = RegistryError::unauthorized("authentication required");
    let v = format!(
        "Bearer realm=\"{}\",service=\"{}\"",
        origin.realm(),
        app.settings.server_name
    );
    e.challenge = HeaderValue::from_str(&v).ok();
    Err(e)
}

/// The upstream a `/v2/` ping stands for: `ns=`, else the host, else the default.
fn ping_upstream(app: &App, host: Option<&str>, ns: Option<&str>) -> crate::upstream::UpstreamId {
    ns.and_then(|n| app.routes.upstream_for_ns(n))
        .or_else(|| host.and_then(|h| app.routes.upstream_for_host(h)))
        .unwrap_or_else(|| app.routes.default_upstream())
}

/// A 401 carries the challenge the client needs to get a usable token.
fn with_challenge(mut e: RegistryError, upstream: &Upstream, origin: &Origin, scope: Option<&Scope>) -> RegistryError {
    if e.status == StatusCode::UNAUTHORIZED && e.challenge.is_none() {
        e.challenge = challenge::for_client(&upstream.client.auth_scheme(), upstream.name(), origin, scope);
        if e.challenge.is_none() {
            // An open upstream that still refused: nothing a token would fix.
            e.status = StatusCode::FORBIDDEN;
            e.code = errors::OciCode::Denied;
        }
    }
    e
}

/// A token request's form body, bounded.
async fn read_form<B>(body: B) -> Result<bytes::Bytes, RegistryError>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, auth::token::MAX_TOKEN_REQUEST);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(RegistryError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            errors::OciCode::Unsupported,
            format!("token request body: {e}"),
        )),
    }
}

/// A connection made for one upstream (its SNI) is not used to reach
/// another (its Host): that is 421, as RFC 9110 has it for a request that
/// reached a server not configured for it.
fn misdirected(app: &App, sni: Option<&str>, host: Option<&str>) -> Option<RegistryError> {
    let (sni, host) = (sni?.to_ascii_lowercase(), host?);
    if sni == host {
        return None;
    }
    let by_sni = app.routes.upstream_for_host(&sni);
    let by_host = app.routes.upstream_for_host(host);
    ((by_sni.is_some() || by_host.is_some()) && by_sni != by_host).then(|| RegistryError::misdirected(&sni, host))
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>, content_type: &'static str) -> Response<Body> {
    let body = body.into();
    let mut r = Response::new(full(body.clone()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

/// Copies one header from an upstream response, when present.
pub(crate) fn copy_header(from: &HeaderMap, to: &mut HeaderMap, name: header::HeaderName) {
    if let Some(v) = from.get(&name) {
        to.insert(name, v.clone());
    }
}

/// A header value from text we built (digests, ranges, media types).
pub(crate) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// An upstream body as the cache's byte source, refusing more than
/// `max_len` bytes when given.
/// Its bytes are counted as fetched from that upstream as they arrive.
/// Opens `req` for the cache's download from `offset` on (a resumed
/// download asks for the rest), notes that `r`'s repository holds `digest`,
/// and marks the content public when fetched without a client's credential.
pub(crate) async fn open_source(
    app: &App,
    r: &RepoRequest,
    req: &crate::upstream::UpstreamRequest,
    offset: u64,
    digest: &crate::reference::Digest,
    max_len: Option<u64>,
    public: bool,
) -> Result<crate::cache::Source, crate::cache::SourceError> {
    let up = app.upstream(r);
    let (resp, start) = up
        .client
        .get_from(req, offset)
        .await
        .map_err(crate::cache::SourceError::new)?;
    app.auth.note_in_repository(up.name(), &r.repo.to_string(), digest);
    let mut source = source_from(resp, max_len);
    source.public = public;
    source.start = start;
    Ok(source)
}

pub(crate) fn source_from(resp: crate::upstream::Response, max_len: Option<u64>) -> crate::cache::Source {
    use futures_util::TryStreamExt;
    let fetched = METRICS
        .upstream_fetched_bytes
        .get_or_create(&crate::metrics::UpstreamLabel::of(resp.upstream()))
        .clone();
    crate::cache::Source {
        stored_by_sender: false,
        media_type: resp.header(header::CONTENT_TYPE).map(str::to_string),
        length: resp.content_length(),
        max_len,
        public: false,
        start: 0,
        body: Box::pin(resp.into_stream().inspect_ok(move |b| {
            fetched.inc_by(b.len() as u64);
        })),
    }
}
