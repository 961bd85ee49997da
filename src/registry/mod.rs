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
pub mod range;
pub mod tags;

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::cache::{Cache, LocalStore};
use crate::config::Settings;
use crate::metrics::METRICS;
use crate::route::{route, Endpoint, Kind, RepoRequest, RouteTable};
use crate::upstream::client::VIA_HEADER;
use crate::upstream::UpstreamClient;
use body::{empty, full, Body};
use errors::RegistryError;

/// The most request-line and header bytes regmirror accepts; registry
/// clients send a few KiB at most (a Bearer token is the largest part).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Everything a request handler needs; shared by all connections.
pub struct App {
    pub settings: Settings,
    pub routes: RouteTable,
    pub upstreams: Vec<UpstreamClient>,
    pub cache: Arc<Cache<LocalStore>>,
    /// This process's loop-detection token (see `VIA_HEADER`).
    pub via: String,
}

/// What the listener knows of the connection a request came on.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub sni: Option<String>,
    pub tls: bool,
    pub peer: Option<std::net::SocketAddr>,
}

impl App {
    pub fn upstream(&self, r: &RepoRequest) -> &UpstreamClient {
        &self.upstreams[r.upstream]
    }

    pub fn namespace(&self, r: &RepoRequest) -> &str {
        &self.settings.upstreams[r.upstream].namespace
    }
}

pub async fn handle<B>(app: Arc<App>, conn: ConnInfo, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    METRICS.requests.inc();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host = request_host(&req, &conn);
    let result = dispatch(&app, &conn, host.as_deref(), &req).await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, host = host.as_deref().unwrap_or("-"), error = %e, "request failed");
            } else {
                tracing::info!(%method, %path, host = host.as_deref().unwrap_or("-"), error = %e, "request rejected");
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
    tracing::info!(
        %method,
        %path,
        host = host.as_deref().unwrap_or("-"),
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

/// The hostname the client addressed: Host header, `:authority` (HTTP/2),
/// or the TLS SNI, without a port.
fn request_host<B>(req: &Request<B>, conn: &ConnInfo) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .or_else(|| conn.sni.clone())?;
    let host = if raw.starts_with('[') {
        raw.split(']').next().map(|h| format!("{h}]")).unwrap_or(raw.clone())
    } else {
        raw.split(':').next().unwrap_or("").to_string()
    };
    Some(host.to_ascii_lowercase())
}

async fn dispatch<B>(
    app: &Arc<App>,
    conn: &ConnInfo,
    host: Option<&str>,
    req: &Request<B>,
) -> Result<Response<Body>, RegistryError> {
    let header_bytes: usize = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(RegistryError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "UNSUPPORTED",
            format!("request line and headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"),
        ));
    }
    if req.headers().get(VIA_HEADER).and_then(|v| v.to_str().ok()) == Some(app.via.as_str()) {
        return Err(RegistryError::loop_detected());
    }
    if conn.tls {
        // The handshake only succeeds for configured names; a Host header
        // naming something else on that connection is refused here.
        if let Some(h) = host {
            let known =
                h == app.settings.server_name || app.routes.upstreams.iter().any(|u| u.hosts.iter().any(|x| x == h));
            if !known && h.parse::<std::net::IpAddr>().is_err() {
                return Err(RegistryError::new(
                    StatusCode::NOT_FOUND,
                    "NAME_UNKNOWN",
                    format!("no upstream is configured for host {h:?}"),
                ));
            }
        }
    }
    let endpoint = route(&app.routes, host, req.uri().path(), req.uri().query())?;
    let method = req.method();
    let read_only = matches!(*method, Method::GET | Method::HEAD);
    let head = *method == Method::HEAD;
    match endpoint {
        Endpoint::Health => Ok(text(StatusCode::OK, "ok\n", "text/plain")),
        Endpoint::Metrics => Ok(text(StatusCode::OK, METRICS.render(), "text/plain; version=0.0.4")),
        _ if !read_only => Err(RegistryError::unsupported(format!(
            "{method} is not supported: regmirror is a read-only pull-through cache"
        ))),
        Endpoint::Ping => Ok(text(StatusCode::OK, "{}", "application/json")),
        Endpoint::Catalog { upstream } => catalog::list(app, upstream, req.uri().query()).await,
        Endpoint::Repo(r) => {
            let span = tracing::info_span!("repo", upstream = %app.upstream(&r).name, repo = %r.repo);
            let work = async {
                match &r.kind {
                    Kind::Manifest(reference) => manifests::serve(app, &r, reference, req.headers(), head).await,
                    Kind::Blob(digest) => blobs::serve(app, &r, digest, req.headers(), head).await,
                    Kind::TagsList => tags::list(app, &r, head).await,
                    Kind::Upload => Err(RegistryError::unsupported(
                        "pushing is not supported: regmirror is a read-only pull-through cache",
                    )),
                }
            };
            work.instrument(span).await
        }
    }
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

/// A header as text, when present and printable.
pub(crate) fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Reads an upstream error body (bounded) and turns it into our error.
pub(crate) async fn upstream_error(upstream: &str, resp: reqwest::Response) -> RegistryError {
    let status = resp.status();
    let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
    let body = read_limited(resp, 64 * 1024).await.unwrap_or_default();
    RegistryError::from_upstream(upstream, status, &body, retry_after)
}

/// Reads a whole upstream body, refusing more than `limit` bytes.
pub(crate) async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| crate::upstream::client::error_chain(&e))?
    {
        if out.len() + chunk.len() > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An upstream body as the cache's byte source.
pub(crate) fn source_from(resp: reqwest::Response) -> crate::cache::Source {
    use futures_util::TryStreamExt;
    let media_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_string);
    let length = resp.content_length();
    let body = resp
        .bytes_stream()
        .map_err(|e| std::io::Error::other(crate::upstream::client::error_chain(&e)));
    crate::cache::Source {
        media_type,
        length,
        body: Box::pin(body),
    }
}
