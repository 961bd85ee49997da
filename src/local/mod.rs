//! Local namespaces (`[[local]]`): the private registry beside the cache.
//!
//! Repositories under a local namespace (`private/app`) are pushed to
//! regmirror and live in the same content-addressed store as the cache, so
//! a layer pulled through the mirror and then pushed is one copy, and a
//! push of an image built `FROM` a cached base uploads only its own
//! layers. Pushed content is never evicted; the namespace's `quota` bounds
//! it instead.
//!
//! `serve` reads as the phases of a request: who is asking (`auth::local`)
//! → may they (pull, push, delete) → the endpoint: uploads (`uploads`),
//! manifests (`manifests`), blobs, tags and referrers (here). Nothing here
//! asks an upstream.

pub mod gc;
pub mod manifests;
pub mod quota;
pub mod session_forward;
pub mod token;
pub mod uploads;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};

use crate::auth::challenge::{self, Origin};
use crate::auth::local::{Action, Caller, LocalAuth};
use crate::auth::scope::Scope;
use crate::cache::{BlobInfo, Link};
use crate::metrics::METRICS;
use crate::reference::{Digest, RepoName};
use crate::registry::body::{empty, full, Body};
use crate::registry::errors::{OciCode, RegistryError};
use crate::registry::{header_value, App};
use crate::route::{Kind, LocalRequest};
use uploads::{ChunkError, Session, Uploads};

/// A request body of a push, whatever connection it came on.
pub type PushBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The state local namespaces keep between requests.
#[derive(Default)]
pub struct Hosted {
    pub uploads: Uploads,
    pub usage: quota::Usage,
}

/// How often abandoned upload sessions are looked for.
const EXPIRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Hosted {
    /// Starts the background work of local namespaces: pinning what they
    /// hold (so the cache's evictor never takes it, even from an index
    /// rebuilt from the store), and removing abandoned upload sessions
    /// until `app` is gone.
    pub fn spawn_background(app: &Arc<App>) {
        if app.settings.locals.is_empty() {
            return;
        }
        let pinning = app.clone();
        tokio::spawn(async move {
            let pinned = pin_all(&pinning).await;
            if let Err(e) = pinned {
                tracing::warn!(error = %e, "could not list what the local namespaces hold; it is pinned as it is used");
            }
        });
        let weak = Arc::downgrade(app);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXPIRY_EVERY).await;
                let Some(app) = weak.upgrade() else { return };
                let locals = &app.settings.locals;
                app.hosted
                    .uploads
                    .expire(
                        |ns| locals.get(ns).map_or(std::time::Duration::ZERO, |l| l.upload_timeout),
                        &app.hosted.usage,
                    )
                    .await;
            }
        });
    }
}

/// Every local repository with its tags, size and last push, for the
/// status page. Walks the namespaces' records (not the content).
pub async fn summary(app: &App) -> Vec<crate::status_page::LocalRepo> {
    let Ok(store) = app.cache.hosted() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ns in &app.settings.locals {
        let repos = match store.repositories(&ns.namespace).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(namespace = %ns.namespace, error = %e, "status page: could not list a local namespace");
                continue;
            }
        };
        for repo in repos {
            let tags = store.tags(&repo).await.map(|t| t.len()).unwrap_or(0);
            let mut size = 0;
            let mut newest: Option<std::time::Duration> = None;
            for kind in [Link::Blob, Link::Manifest] {
                for d in store.links(&repo, kind).await.unwrap_or_default() {
                    if let Ok(Some(info)) = app.cache.stat(&d).await {
                        size += info.size;
                    }
                    if kind == Link::Manifest {
                        if let Ok(Some(age)) = store.link_age(&repo, kind, &d).await {
                            newest = Some(newest.map_or(age, |n| n.min(age)));
                        }
                    }
                }
            }
            out.push(crate::status_page::LocalRepo {
                repository: repo.to_string(),
                tags,
                size,
                last_push: newest.and_then(|a| std::time::SystemTime::now().checked_sub(a)),
            });
        }
    }
    out
}

/// Pins every digest a local repository holds.
async fn pin_all(app: &App) -> std::io::Result<()> {
    let store = app.cache.hosted()?;
    let mut n = 0usize;
    for ns in &app.settings.locals {
        for repo in store.repositories(&ns.namespace).await? {
            for kind in [Link::Blob, Link::Manifest] {
                for d in store.links(&repo, kind).await? {
                    app.cache.pin(&d);
                    n += 1;
                }
            }
        }
    }
    tracing::debug!(digests = n, "local namespaces' content pinned");
    Ok(())
}

fn local_auth(app: &App) -> Result<&LocalAuth, RegistryError> {
    app.auth
        .local
        .as_ref()
        .ok_or_else(|| RegistryError::internal("no local namespace is configured"))
}

/// What a request to a local repository asks to do.
fn action_of(method: &Method, kind: &Kind) -> Result<Action, RegistryError> {
    Ok(match (method, kind) {
        (&Method::GET | &Method::HEAD, _) => Action::Pull,
        (&Method::DELETE, Kind::Upload(Some(_))) => Action::Push,
        (&Method::DELETE, Kind::Manifest(_) | Kind::Blob(_)) => Action::Delete,
        (&Method::POST, Kind::Upload(None)) => Action::Push,
        (&Method::PATCH | &Method::PUT, Kind::Upload(Some(_))) => Action::Push,
        (&Method::PUT, Kind::Manifest(_)) => Action::Push,
        _ => {
            return Err(RegistryError::unsupported(format!(
                "{method} is not supported on this endpoint"
            )))
        }
    })
}

/// How much of a refused request's body is read before the answer: a
/// manifest or a small chunk, enough that clients which write the whole
/// body before reading any answer (containerd, through a pipe) see the
/// refusal instead of hanging; a layer's worth is not read.
const REFUSED_BODY_DRAIN: u64 = 4 * 1024 * 1024;
/// How long that reading may take.
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn serve(
    app: &Arc<App>,
    origin: &Origin,
    r: LocalRequest,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let caller = match admit(app, origin, &r, req.method(), req.headers()).await {
        Ok(c) => c,
        Err(e) => return Err(refuse_unread(e, req).await),
    };
    // A push refused mid-body leaves the rest unread, so the HTTP/1.1
    // connection cannot carry another request: say so, or a client that
    // reuses it sees its next request fail with no answer at all.
    let unread_body =
        req.version() <= http::Version::HTTP_11 && matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    match serve_request(app, &r, &caller, req).await {
        Err(e) if unread_body => Err(e.with_header(header::CONNECTION, HeaderValue::from_static("close"))),
        other => other,
    }
}

/// Answers a request refused before its body was read: a small body is
/// read first (and the connection stays usable); a large or slow one is
/// left, and the HTTP/1.1 connection closed after the answer.
async fn refuse_unread(e: RegistryError, req: Request<PushBody>) -> RegistryError {
    if req.version() > http::Version::HTTP_11 || !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return e;
    }
    let declared = content_length(req.headers());
    if declared == Some(0) {
        return e;
    }
    let small = declared.is_none_or(|n| n <= REFUSED_BODY_DRAIN);
    let drained = small && tokio::time::timeout(REFUSED_BODY_WAIT, drain(req.into_body())).await == Ok(true);
    if drained {
        e
    } else {
        e.with_header(header::CONNECTION, HeaderValue::from_static("close"))
    }
}

/// Reads a body to its end; false when it breaks off or passes the limit.
async fn drain(mut body: PushBody) -> bool {
    use http_body_util::BodyExt;
    let mut read: u64 = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        if let Ok(data) = frame.into_data() {
            read += data.len() as u64;
            if read > REFUSED_BODY_DRAIN {
                return false;
            }
        }
    }
    true
}

/// Who is asking, once they may do what the request asks.
async fn admit(
    app: &Arc<App>,
    origin: &Origin,
    r: &LocalRequest,
    method: &Method,
    headers: &http::HeaderMap,
) -> Result<Caller, RegistryError> {
    let auth = local_auth(app)?;
    let ns = auth
        .namespace(r.namespace)
        .ok_or_else(|| RegistryError::internal("local namespace out of range"))?;
    let action = action_of(method, &r.kind)?;
    let service = app.settings.server_name.as_str();
    let caller = match auth.caller(r.namespace, headers).await {
        Ok(c) => c,
        Err(e) => return Err(refused(e, origin, service, &r.repo, action)),
    };
    if action == Action::Delete && !ns.delete {
        return Err(RegistryError::unsupported(format!(
            "deleting is turned off for namespace {:?} (local.delete = false)",
            ns.namespace
        )));
    }
    if let Err(e) = auth.authorize(r.namespace, &caller, &r.repo, action) {
        return Err(refused(e, origin, service, &r.repo, action));
    }
    Ok(caller)
}

async fn serve_request(
    app: &Arc<App>,
    r: &LocalRequest,
    caller: &Caller,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let method = req.method().clone();
    match (&method, r.kind.clone()) {
        (&Method::GET | &Method::HEAD, Kind::Manifest(reference)) => {
            manifests::get(app, &r.repo, &reference, method == Method::HEAD).await
        }
        (&Method::PUT, Kind::Manifest(reference)) => manifests::put(app, r, &reference, req).await,
        (&Method::DELETE, Kind::Manifest(reference)) => manifests::delete(app, r, &reference).await,
        (&Method::GET | &Method::HEAD, Kind::Blob(d)) => get_blob(app, &r.repo, &d, req.headers()).await,
        (&Method::DELETE, Kind::Blob(d)) => delete_blob(app, r, &d).await,
        (&Method::GET, Kind::TagsList) => tags_list(app, r).await,
        (&Method::GET, Kind::Referrers(d)) => referrers(app, &r.repo, &d, req.uri().query()).await,
        (&Method::POST, Kind::Upload(None)) => start_upload(app, r, caller, req).await,
        (_, Kind::Upload(Some(id))) => {
            if let Some(member) = session_forward::held_elsewhere(app, &id, req.headers()) {
                return session_forward::forward(app, &id, &member, req).await;
            }
            let session = app.hosted.uploads.get(&id, &r.repo, caller.name())?;
            match method {
                Method::GET => Ok(upload_status(&session, StatusCode::NO_CONTENT).await),
                Method::PATCH => patch_upload(app, r, &session, req).await,
                Method::PUT => finish_upload(app, r, &session, req).await,
                _ => {
                    app.hosted.uploads.remove(&session.id, &app.hosted.usage).await;
                    Ok(status(StatusCode::NO_CONTENT))
                }
            }
        }
        _ => Err(RegistryError::unsupported(format!(
            "{method} is not supported on this endpoint"
        ))),
    }
}

/// A refusal, counted; a 401 carries the challenge that gets the client a
/// token for `repo`.
fn refused(mut e: RegistryError, origin: &Origin, service: &str, repo: &RepoName, action: Action) -> RegistryError {
    METRICS.local_refused.inc();
    if e.status == StatusCode::UNAUTHORIZED && e.challenge.is_none() {
        let actions = match action {
            Action::Pull => vec!["pull".to_string()],
            Action::Push => vec!["pull".to_string(), "push".to_string()],
            Action::Delete => vec!["delete".to_string()],
        };
        let scope = Scope::Repository {
            class: "repository".into(),
            name: repo.as_str().to_string(),
            actions,
        };
        e.challenge = challenge::for_local(origin, service, &scope);
    }
    e
}

fn status(s: StatusCode) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = s;
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

/// What `repo` may read of `d`: content linked to it, or content the cache
/// holds as public (pulled anonymously through the mirror, so anyone
/// allowed to use the proxy may read it anyway).
pub(crate) async fn readable(app: &App, repo: &RepoName, d: &Digest) -> Result<Option<BlobInfo>, RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    let linked = store.linked(repo, Link::Blob, d).await.map_err(store_error)?
        || store.linked(repo, Link::Manifest, d).await.map_err(store_error)?;
    Ok(match app.cache.stat(d).await? {
        Some(info) if linked || info.public => Some(info),
        _ => None,
    })
}

pub(crate) fn store_error(e: std::io::Error) -> RegistryError {
    RegistryError::internal(format!("store: {e}"))
}

fn blob_unknown(d: &Digest) -> RegistryError {
    RegistryError::new(
        StatusCode::NOT_FOUND,
        OciCode::BlobUnknown,
        format!("blob unknown: {d}"),
    )
}

async fn get_blob(
    app: &App,
    repo: &RepoName,
    d: &Digest,
    headers: &HeaderMap,
) -> Result<Response<Body>, RegistryError> {
    if readable(app, repo, d).await?.is_none() {
        return Err(blob_unknown(d));
    }
    let served = app.cache.open_stored(d).await?.ok_or_else(|| blob_unknown(d))?;
    Ok(crate::registry::blobs::respond(served, headers, d))
}

async fn delete_blob(app: &App, r: &LocalRequest, d: &Digest) -> Result<Response<Body>, RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    if !store.unlink(&r.repo, Link::Blob, d).await.map_err(store_error)? {
        return Err(blob_unknown(d));
    }
    app.hosted.usage.recount(r.namespace);
    tracing::info!(repo = %r.repo, digest = %d, "blob deleted from a local repository");
    Ok(status(StatusCode::ACCEPTED))
}

async fn tags_list(app: &App, r: &LocalRequest) -> Result<Response<Body>, RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    let tags = store.tags(&r.repo).await.map_err(store_error)?;
    if tags.is_empty()
        && store
            .links(&r.repo, Link::Manifest)
            .await
            .map_err(store_error)?
            .is_empty()
    {
        return Err(RegistryError::new(
            StatusCode::NOT_FOUND,
            OciCode::NameUnknown,
            format!("repository {} is not known", r.repo),
        ));
    }
    let (n, last) = r.page.clone().unwrap_or((None, None));
    let mut names: Vec<&str> = tags.iter().map(|(t, _)| t.as_str()).collect();
    names.sort_unstable();
    if let Some(last) = &last {
        names.retain(|t| *t > last.as_str());
    }
    let more = n.is_some_and(|n| names.len() > n as usize);
    if let Some(n) = n {
        names.truncate(n as usize);
    }
    let body = serde_json::json!({ "name": r.repo.as_str(), "tags": names }).to_string();
    let mut resp = json_response(StatusCode::OK, body, "application/json");
    if let (true, Some(n), Some(end)) = (more, n, names.last()) {
        let next = format!("</v2/{}/tags/list?n={n}&last={end}>; rel=\"next\"", r.repo);
        resp.headers_mut().insert(header::LINK, header_value(&next));
    }
    Ok(resp)
}

async fn referrers(
    app: &App,
    repo: &RepoName,
    d: &Digest,
    query: Option<&str>,
) -> Result<Response<Body>, RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    let artifact_type = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.into_owned());
    let mut manifests: Vec<serde_json::Value> = store
        .referrers(repo, d)
        .await
        .map_err(store_error)?
        .iter()
        .filter_map(|raw| serde_json::from_slice(raw).ok())
        .filter(|desc: &serde_json::Value| {
            artifact_type
                .as_deref()
                .is_none_or(|t| desc.get("artifactType").and_then(|a| a.as_str()) == Some(t))
        })
        .collect();
    manifests.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifests::OCI_INDEX,
        "manifests": manifests,
    })
    .to_string();
    let mut resp = json_response(StatusCode::OK, body, manifests::OCI_INDEX);
    if artifact_type.is_some() {
        resp.headers_mut()
            .insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
    }
    Ok(resp)
}

fn json_response(s: StatusCode, body: String, content_type: &str) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = s;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header_value(content_type));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// The query of an upload request.
#[derive(Default)]
struct UploadQuery {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
}

fn upload_query(q: Option<&str>) -> UploadQuery {
    let mut out = UploadQuery::default();
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match &*k {
            "digest" => out.digest = Some(v.into_owned()),
            "mount" => out.mount = Some(v.into_owned()),
            "from" => out.from = Some(v.into_owned()),
            _ => {}
        }
    }
    out
}

fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    Digest::parse(s).map_err(|e| RegistryError::new(StatusCode::BAD_REQUEST, OciCode::DigestInvalid, e))
}

/// `Content-Length`, when the client sent one that parses.
fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// `Content-Range` of a chunk (`<start>-<end>`, inclusive), checked.
fn content_range(h: &HeaderMap) -> Result<Option<(u64, u64)>, RegistryError> {
    let Some(v) = h.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        RegistryError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            OciCode::BlobUploadInvalid,
            "Content-Range must be <start>-<end>",
        )
    };
    let text = v.to_str().map_err(|_| bad())?.trim();
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let text = text.split('/').next().unwrap_or("");
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let (start, end): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if end < start {
        return Err(bad());
    }
    Ok(Some((start, end)))
}

/// The namespace's quota, if it has one, with its count loaded so that
/// [`quota::Usage::fits`] and `claim` can answer.
async fn quota(app: &App, r: &LocalRequest) -> Option<u64> {
    let ns = app.settings.locals.get(r.namespace)?;
    let quota = ns.quota?;
    app.hosted.usage.bytes(&app.cache, r.namespace, &ns.namespace).await;
    Some(quota)
}

/// Whether `len` more bytes fit in the namespace beside what it holds
/// and what its open uploads have received.
pub(crate) async fn fits(app: &App, r: &LocalRequest, len: u64) -> bool {
    match quota(app, r).await {
        Some(q) => app.hosted.usage.fits(r.namespace, len, q),
        None => true,
    }
}

fn over_quota(app: &App, r: &LocalRequest) -> RegistryError {
    let (name, quota) = app
        .settings
        .locals
        .get(r.namespace)
        .map(|n| (n.namespace.clone(), n.quota.unwrap_or(0)))
        .unwrap_or_default();
    RegistryError::new(
        StatusCode::FORBIDDEN,
        OciCode::Denied,
        format!("namespace {name:?} is at its quota of {quota} bytes (local.quota): delete something and run `regmirror cache gc`"),
    )
}

fn upload_location(repo: &RepoName, id: &uploads::Session) -> String {
    format!("/v2/{repo}/blobs/uploads/{}", id.id)
}

async fn upload_status(session: &Session, s: StatusCode) -> Response<Body> {
    let len = session.received().await;
    let mut resp = status(s);
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&upload_location(&session.repo, session)));
    h.insert(header::RANGE, header_value(&format!("0-{}", len.saturating_sub(1))));
    h.insert("docker-upload-uuid", header_value(session.id.as_str()));
    resp
}

fn blob_created(repo: &RepoName, d: &Digest) -> Response<Body> {
    let mut resp = status(StatusCode::CREATED);
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&format!("/v2/{repo}/blobs/{d}")));
    h.insert("docker-content-digest", header_value(d.as_str()));
    resp
}

async fn start_upload(
    app: &App,
    r: &LocalRequest,
    caller: &Caller,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let q = upload_query(req.uri().query());
    if let Some(m) = &q.mount {
        let d = parse_digest(m)?;
        if mount(app, r, caller, &d, q.from.as_deref()).await? {
            return Ok(blob_created(&r.repo, &d));
        }
    }
    let max = app
        .settings
        .locals
        .get(r.namespace)
        .map_or(1, |l| l.max_uploads_per_user);
    let session = app
        .hosted
        .uploads
        .open(
            &app.cache,
            r.namespace,
            &r.repo,
            caller.name(),
            max,
            app.cluster.as_ref().map(|c| c.self_tag()).as_deref(),
        )
        .await?;
    let Some(digest) = q.digest else {
        return Ok(upload_status(&session, StatusCode::ACCEPTED).await);
    };
    // Monolithic: the whole blob in the POST.
    let d = match parse_digest(&digest) {
        Ok(d) => d,
        Err(e) => {
            app.hosted.uploads.remove(&session.id, &app.hosted.usage).await;
            return Err(e);
        }
    };
    let declared = content_length(req.headers());
    append(app, r, &session, req.into_body(), None, declared).await?;
    commit(app, r, &session, &d).await
}

async fn patch_upload(
    app: &App,
    r: &LocalRequest,
    session: &Session,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let range = content_range(req.headers())?;
    let declared = content_length(req.headers());
    if let (Some((start, end)), Some(len)) = (range, declared) {
        if end - start + 1 != len {
            return Err(RegistryError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                OciCode::BlobUploadInvalid,
                format!("Content-Range {start}-{end} does not match Content-Length {len}"),
            ));
        }
    }
    append(app, r, session, req.into_body(), range.map(|(s, _)| s), declared).await?;
    Ok(upload_status(session, StatusCode::ACCEPTED).await)
}

async fn finish_upload(
    app: &App,
    r: &LocalRequest,
    session: &Session,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let q = upload_query(req.uri().query());
    let d = match q.digest.as_deref().map(parse_digest) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return Err(e),
        None => {
            return Err(RegistryError::new(
                StatusCode::BAD_REQUEST,
                OciCode::DigestInvalid,
                "the PUT that closes an upload names its digest (?digest=)",
            ))
        }
    };
    let range = content_range(req.headers())?;
    let declared = content_length(req.headers());
    append(app, r, session, req.into_body(), range.map(|(s, _)| s), declared).await?;
    commit(app, r, session, &d).await
}

/// Appends a body to `session`, within the namespace's quota.
async fn append(
    app: &App,
    r: &LocalRequest,
    session: &Session,
    body: PushBody,
    start: Option<u64>,
    declared: Option<u64>,
) -> Result<(), RegistryError> {
    let quota = quota(app, r).await;
    let usage = &app.hosted.usage;
    match app
        .hosted
        .uploads
        .append(session, body, start, declared, usage, quota)
        .await
    {
        Ok(_) => Ok(()),
        Err(ChunkError::OutOfOrder { len }) => Err(RegistryError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            OciCode::BlobUploadInvalid,
            format!("the chunk must start at byte {len}, where the upload stands"),
        )
        .with_header(header::RANGE, header_value(&format!("0-{}", len.saturating_sub(1))))
        .with_header(header::LOCATION, header_value(&upload_location(&session.repo, session)))),
        Err(ChunkError::Broken(e)) => {
            tracing::info!(upload = %session.id, repo = %r.repo, error = %e, "upload abandoned");
            Err(e)
        }
        Err(ChunkError::OverQuota(_)) => {
            tracing::info!(upload = %session.id, repo = %r.repo, "upload refused: over quota");
            Err(over_quota(app, r))
        }
    }
}

/// Verifies and commits the session's bytes as `d`, linked to the repository.
async fn commit(app: &App, r: &LocalRequest, session: &Session, d: &Digest) -> Result<Response<Body>, RegistryError> {
    let len = app
        .hosted
        .uploads
        .finish(&app.cache, session, d, &app.hosted.usage)
        .await?;
    link(app, r, Link::Blob, d, len).await?;
    METRICS.pushed_blobs.inc();
    METRICS.pushed_bytes.inc_by(len);
    tracing::info!(repo = %r.repo, digest = %d, bytes = len, "blob pushed");
    Ok(blob_created(&r.repo, d))
}

/// Links stored content to the repository, pinned and counted.
pub(crate) async fn link(app: &App, r: &LocalRequest, kind: Link, d: &Digest, size: u64) -> Result<(), RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    store.link(&r.repo, kind, d).await.map_err(store_error)?;
    app.cache.pin(d);
    app.hosted.usage.add(r.namespace, d, size);
    Ok(())
}

/// A cross-repository mount: true when `d` is now linked to the repository.
/// From a local repository the caller may pull from, or without `from`
/// from any repository of the same namespace the caller may pull from;
/// and either way from what the cache holds as public. Never content the
/// cache fetched with somebody's private credential.
async fn mount(
    app: &App,
    r: &LocalRequest,
    caller: &Caller,
    d: &Digest,
    from: Option<&str>,
) -> Result<bool, RegistryError> {
    let auth = local_auth(app)?;
    let store = app.cache.hosted().map_err(store_error)?;
    let Some(info) = app.cache.stat(d).await? else {
        return Ok(false);
    };
    let mut sources: Vec<RepoName> = Vec::new();
    match from.map(RepoName::parse) {
        Some(Ok(f)) => sources.push(f),
        Some(Err(_)) => {}
        None => {
            let ns = &app.settings.locals[r.namespace].namespace;
            sources = store.repositories(ns).await.map_err(store_error)?;
        }
    }
    let mut found = info.public;
    for src in sources {
        if found {
            break;
        }
        let Some(ns) = auth.namespace_of(src.as_str()) else {
            continue;
        };
        // A token names the repositories it was granted; a mount without
        // `from` reads with the caller's own rights.
        let may = auth.permits(ns, caller, &src, Action::Pull)
            || (from.is_none() && auth.rights(ns, caller.user.as_deref()).contains(&Action::Pull));
        if may && store.linked(&src, Link::Blob, d).await.map_err(store_error)? {
            found = true;
        }
    }
    if !found {
        return Ok(false);
    }
    if !fits(app, r, info.size).await && !store.linked(&r.repo, Link::Blob, d).await.map_err(store_error)? {
        return Err(over_quota(app, r));
    }
    link(app, r, Link::Blob, d, info.size).await?;
    tracing::info!(repo = %r.repo, digest = %d, from = from.unwrap_or("-"), "blob mounted");
    Ok(true)
}
