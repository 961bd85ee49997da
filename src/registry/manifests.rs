//! `/v2/<name>/manifests/<reference>`.
//!
//! By digest: served from the store, fetched once on a miss, byte for byte
//! with its stored media type. By tag: upstream is asked with a HEAD
//! carrying the client's Accept (cheap, and not counted against Docker Hub's
//! pull limit); the answer's digest is then served from the store when
//! present. When upstream fails (unreachable, 5xx, 429) the last digest seen
//! for (repo, tag, Accept) is served with a `Warning: 110` header.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response};

use super::body::{stream, Body};
use super::errors::{OciCode, RegistryError};
use super::{copy_header, header_value, source_from, App};
use crate::auth::{Access, ContentKind, FetchPlan};
use crate::cache::{FetchError, Served, Source, TagRecord};
use crate::metrics::METRICS;
use crate::reference::{Digest, Reference, Tag};
use crate::route::RepoRequest;
use crate::upstream::{self, Credential, UpstreamRequest};

/// Sent upstream when the client names no manifest type (no Accept, or only
/// `*/*`), so upstream never refuses a modern manifest or converts it.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; a bigger "manifest" is refused rather than buffered.
const MAX_MANIFEST: usize = 4 << 20;

pub async fn serve(
    app: &Arc<App>,
    r: &RepoRequest,
    reference: &Reference,
    headers: &HeaderMap,
    head: bool,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let accept = accept_of(headers);
    match reference {
        Reference::Digest(d) => by_digest(app, r, d, &accept, head, access).await,
        Reference::Tag(t) => by_tag(app, r, t, &accept, head, access).await,
    }
}

/// All Accept values of the request as one header value.
fn accept_of(headers: &HeaderMap) -> String {
    let joined = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    // `*/*` (curl, plain HTTP libraries) names no manifest type; upstream
    // would then refuse OCI manifests or fall back to a legacy format.
    if joined.contains("vnd.") {
        joined
    } else {
        DEFAULT_ACCEPT.to_string()
    }
}

/// A stable key for a set of accepted media types, order and spacing ignored.
pub fn accept_key(accept: &str) -> String {
    let mut types: Vec<&str> = accept
        .split(',')
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .filter(|t| !t.is_empty())
        .collect();
    types.sort_unstable();
    types.dedup();
    Digest::of(types.join(",").as_bytes()).hex()[..16].to_string()
}

fn manifest_request(
    r: &RepoRequest,
    reference: &str,
    method: Method,
    accept: &str,
    credential: Credential,
) -> UpstreamRequest {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(accept) {
        headers.insert(header::ACCEPT, v);
    }
    UpstreamRequest {
        method,
        path: format!("/v2/{}/manifests/{reference}", r.repo),
        query: None,
        headers,
        scope: format!("repository:{}:pull", r.repo),
        credential,
    }
}

async fn by_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
    head: bool,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let manifest = fetch_by_digest(app, r, d, accept, access, false).await?;
    Ok(respond(d, manifest, head, None))
}

/// A manifest ready to send. Its media type is always known: bytes stored
/// without one (fetched through the blobs URL) never answer as a manifest.
struct Manifest {
    media_type: String,
    size: Option<u64>,
    body: ManifestBody,
}

enum ManifestBody {
    Served(Served),
    Fetched(bytes::Bytes),
}

impl Manifest {
    fn from_served(served: Served) -> Option<Manifest> {
        Some(Manifest {
            media_type: served.info.media_type.clone()?,
            size: served.info.size,
            body: ManifestBody::Served(served),
        })
    }
}

/// A manifest by digest, once this client may have it: from the store, or
/// fetched once. `proven_public`: an anonymous tag HEAD just named it.
async fn fetch_by_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
    access: &Access<'_>,
    proven_public: bool,
) -> Result<Manifest, RegistryError> {
    let plan = access
        .content(&app.cache, d, ContentKind::Manifest, proven_public)
        .await
        .map_err(|e| manifest_unknown(e, d))?;
    let served = fetch_served(app, r, d, accept, &plan).await?;
    match Manifest::from_served(served) {
        Some(m) => Ok(m),
        None => fetch_media_type(app, r, d, accept, plan.credential).await,
    }
}

/// The content under `d` is stored (or downloading) without a media type:
/// ask upstream for it as a manifest, check the bytes are the same, and
/// keep the type it names.
async fn fetch_media_type(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
    credential: Credential,
) -> Result<Manifest, RegistryError> {
    let upstream = app.upstream(r);
    let resp = upstream
        .client
        .get_ok(&manifest_request(r, &d.to_string(), Method::GET, accept, credential))
        .await
        .map_err(|e| manifest_unknown(e.into(), d))?;
    let media_type = resp
        .header(header::CONTENT_TYPE)
        .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
        .filter(|t| !t.is_empty() && t != "application/octet-stream");
    let bytes = resp.bytes(MAX_MANIFEST, &format!("manifest {d}")).await?;
    let mut hasher = d.hasher();
    hasher.update(&bytes);
    let got = hasher.finish();
    if &got != d {
        return Err(FetchError::DigestMismatch {
            expected: d.clone(),
            got,
        }
        .into());
    }
    let Some(media_type) = media_type else {
        return Err(upstream::Error::Protocol {
            upstream: upstream.name().to_string(),
            message: format!("manifest {d} was served without a media type"),
        }
        .into());
    };
    app.cache.set_media_type(d, &media_type).await;
    Ok(Manifest {
        media_type,
        size: Some(bytes.len() as u64),
        body: ManifestBody::Fetched(bytes),
    })
}

fn manifest_unknown(e: RegistryError, d: &Digest) -> RegistryError {
    e.when_not_found(OciCode::ManifestUnknown, format!("manifest unknown: {d}"))
        .with_detail(serde_json::json!({ "digest": d.to_string() }))
}

async fn fetch_served(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
    plan: &FetchPlan,
) -> Result<Served, RegistryError> {
    let app2 = app.clone();
    let req = manifest_request(r, &d.to_string(), Method::GET, accept, plan.credential.clone());
    let upstream = r.upstream;
    let public = plan.public;
    app.cache
        .get_or_fetch(d, move || {
            Box::pin(async move {
                let resp = app2.upstreams.get(upstream).client.get_ok(&req).await?;
                let mut source = source_from(resp, Some(MAX_MANIFEST as u64));
                source.public = public;
                Ok(source)
            })
        })
        .await
        .map_err(|e| manifest_unknown(e.into(), d))
}

async fn by_tag(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
    head: bool,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let client = &app.upstream(r).client;
    let key = accept_key(accept);

    let asked = client
        .get_ok(&manifest_request(
            r,
            tag.as_str(),
            Method::HEAD,
            accept,
            access.credential(),
        ))
        .await;
    let resp = match asked {
        Ok(resp) => resp,
        Err(e) => return stale_or(app, r, tag, &key, head, e, access).await,
    };
    access.note_public();

    let digest = resp.header("docker-content-digest").and_then(|v| Digest::parse(v).ok());
    let Some(digest) = digest else {
        // Upstream did not say which digest: one GET by tag, stored by the digest of its bytes.
        return by_tag_without_digest(app, r, tag, accept, &key, head, access).await;
    };
    let media_type = resp.header(header::CONTENT_TYPE).unwrap_or("").to_string();
    // A HEAD response has no body: read the announced length, not the received one.
    let size = resp
        .header(header::CONTENT_LENGTH)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let record = TagRecord {
        digest: digest.to_string(),
        media_type,
        size,
        public: access.answers_are_public(),
    };
    app.cache.record_tag(app.repo_key(r), tag, &key, &record).await;

    if head && app.cache.stat(&digest).await.ok().flatten().is_none() {
        // Answer a HEAD miss with what upstream said; nothing to fetch yet.
        let mut out = Response::new(super::body::empty());
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::ETAG] {
            copy_header(resp.headers(), out.headers_mut(), name);
        }
        out.headers_mut()
            .insert("docker-content-digest", header_value(&digest.to_string()));
        return Ok(out);
    }
    let manifest = fetch_by_digest(app, r, &digest, accept, access, access.answers_are_public()).await?;
    Ok(respond(&digest, manifest, head, None))
}

async fn by_tag_without_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
    key: &str,
    head: bool,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let client = &app.upstream(r).client;
    let resp = match client
        .get_ok(&manifest_request(
            r,
            tag.as_str(),
            Method::GET,
            accept,
            access.credential(),
        ))
        .await
    {
        Ok(resp) => resp,
        Err(e) => return stale_or(app, r, tag, key, head, e, access).await,
    };
    let public = access.answers_are_public();
    let media_type = resp.header(header::CONTENT_TYPE).map(str::to_string);
    let bytes = resp.bytes(MAX_MANIFEST, &format!("manifest {}:{tag}", r.repo)).await?;
    let digest = Digest::of(&bytes);
    let record = TagRecord {
        digest: digest.to_string(),
        media_type: media_type.clone().unwrap_or_default(),
        size: bytes.len() as u64,
        public,
    };
    app.cache.record_tag(app.repo_key(r), tag, key, &record).await;
    let length = Some(bytes.len() as u64);
    let served = app
        .cache
        .get_or_fetch(&digest, move || {
            Box::pin(async move {
                let body = futures_util::stream::once(async move { Ok(bytes) });
                Ok(Source {
                    media_type,
                    length,
                    max_len: None,
                    public,
                    body: Box::pin(body),
                })
            })
        })
        .await?;
    let manifest = match Manifest::from_served(served) {
        Some(m) => m,
        None => fetch_media_type(app, r, &digest, accept, access.credential()).await?,
    };
    Ok(respond(&digest, manifest, head, None))
}

/// Upstream failed on a tag: serve the last digest seen for it when the
/// failure is upstream's (down, 5xx, 429); pass other answers (404, 401) on.
async fn stale_or(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    key: &str,
    head: bool,
    err: upstream::Error,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let refuse = |err: upstream::Error| {
        RegistryError::from(err).when_not_found(
            OciCode::ManifestUnknown,
            format!("manifest unknown: {}:{tag}", r.client_repo),
        )
    };
    if !err.is_transient() {
        return Err(refuse(err));
    }
    let Some(record) = app.cache.last_tag(app.repo_key(r), tag, key).await else {
        return Err(refuse(err));
    };
    if !access.may_read_recorded(record.public) {
        return Err(refuse(err));
    }
    let Ok(digest) = Digest::parse(&record.digest) else {
        return Err(refuse(err));
    };
    let Some(manifest) = app
        .cache
        .open_stored(&digest)
        .await
        .ok()
        .flatten()
        .and_then(Manifest::from_served)
    else {
        return Err(refuse(err));
    };
    METRICS.stale_served.inc();
    tracing::warn!(tag = %tag, %digest, error = %err, "upstream failed; serving the cached tag");
    let warning = format!(
        "110 regmirror \"Response is Stale: upstream {}\"",
        app.upstream(r).name()
    );
    Ok(respond(&digest, manifest, head, Some(warning)))
}

/// The manifest response: stored bytes with their own media type, length,
/// digest and ETag; never converted.
fn respond(digest: &Digest, manifest: Manifest, head: bool, warning: Option<String>) -> Response<Body> {
    let mut resp = match (head, manifest.body) {
        (true, _) => Response::new(super::body::empty()),
        (false, ManifestBody::Served(served)) => Response::new(stream(served.into_stream(0, None))),
        (false, ManifestBody::Fetched(bytes)) => Response::new(super::body::full(bytes)),
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&manifest.media_type));
    if let Some(s) = manifest.size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(s));
    }
    h.insert("docker-content-digest", header_value(&digest.to_string()));
    h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    if let Some(w) = warning {
        h.insert(header::WARNING, header_value(&w));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_without_manifest_types_asks_for_all_of_them() {
        let mut h = HeaderMap::new();
        assert_eq!(accept_of(&h), DEFAULT_ACCEPT);
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert_eq!(accept_of(&h), DEFAULT_ACCEPT);
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        assert_eq!(
            accept_of(&h),
            "*/*, application/vnd.oci.image.index.v1+json",
            "every Accept line is kept"
        );
    }

    #[test]
    fn accept_key_ignores_order_spacing_and_params() {
        let a = accept_key("application/a, application/b;q=0.9");
        assert_eq!(a, accept_key("application/b,application/a"));
        assert_ne!(a, accept_key("application/a"));
    }
}
