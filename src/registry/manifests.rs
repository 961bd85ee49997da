//! `/v2/<name>/manifests/<reference>`.
//!
//! By digest: served from the store, fetched once on a miss, byte for byte
//! with its stored media type. By tag: upstream is asked with a HEAD
//! carrying the client's Accept (cheap, and not counted against Docker Hub's
//! pull limit); the answer's digest is then served from the store when
//! present. When upstream fails (unreachable, 5xx, 429) the last digest seen
//! for (repo, tag, Accept) is served with a `Warning: 110` header.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::body::{stream, Body};
use super::errors::RegistryError;
use super::{copy_header, header_str, header_value, read_limited, source_from, upstream_error, App};
use crate::cache::{Served, Source, Store, TagRecord};
use crate::metrics::METRICS;
use crate::reference::{Digest, Reference, Tag};
use crate::route::RepoRequest;
use crate::upstream::UpstreamRequest;

/// Sent upstream when the client names no manifest type (no Accept, or only
/// `*/*`), so upstream never refuses a modern manifest or converts it.
const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
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
) -> Result<Response<Body>, RegistryError> {
    let accept = accept_of(headers);
    match reference {
        Reference::Digest(d) => by_digest(app, r, d, &accept, head).await,
        Reference::Tag(t) => by_tag(app, r, t, &accept, head).await,
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

fn manifest_request(r: &RepoRequest, reference: &str, method: Method, accept: &str) -> UpstreamRequest {
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
    }
}

async fn by_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
    head: bool,
) -> Result<Response<Body>, RegistryError> {
    let served = fetch_by_digest(app, r, d, accept).await?;
    Ok(respond(d, served, head, None))
}

async fn fetch_by_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
) -> Result<Served<crate::cache::LocalStore>, RegistryError> {
    let app2 = app.clone();
    let req = manifest_request(r, &d.to_string(), Method::GET, accept);
    let upstream = r.upstream;
    let digest = d.clone();
    app.cache
        .get_or_fetch(d, move || {
            Box::pin(async move {
                let client = &app2.upstreams[upstream];
                let resp = client.send(&req).await?;
                if resp.status() == StatusCode::NOT_FOUND {
                    let e = upstream_error(&client.name, resp).await;
                    return Err(RegistryError {
                        code: "MANIFEST_UNKNOWN".into(),
                        ..e
                    }
                    .with_detail(serde_json::json!({ "digest": digest.to_string() })));
                }
                if resp.status() != StatusCode::OK {
                    return Err(upstream_error(&client.name, resp).await);
                }
                if resp.content_length().is_some_and(|l| l > MAX_MANIFEST as u64) {
                    return Err(RegistryError::upstream_unavailable(
                        &client.name,
                        format!("manifest {digest} is larger than {MAX_MANIFEST} bytes"),
                    ));
                }
                Ok(source_from(resp))
            })
        })
        .await
}

async fn by_tag(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
    head: bool,
) -> Result<Response<Body>, RegistryError> {
    let client = app.upstream(r);
    let ns = app.namespace(r).to_string();
    let key = accept_key(accept);
    let store = app.cache.store().clone();

    let asked = client
        .send(&manifest_request(r, tag.as_str(), Method::HEAD, accept))
        .await;
    let resp = match asked {
        Ok(resp) if resp.status() == StatusCode::OK => resp,
        Ok(resp) => {
            let e = upstream_error(&client.name, resp).await;
            let e = if e.status == StatusCode::NOT_FOUND {
                RegistryError {
                    code: "MANIFEST_UNKNOWN".into(),
                    message: format!("manifest unknown: {}:{tag}", r.client_repo),
                    ..e
                }
            } else {
                e
            };
            return stale_or(app, r, tag, &key, head, e).await;
        }
        Err(e) => return stale_or(app, r, tag, &key, head, e).await,
    };

    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    let Some(digest) = digest else {
        // Upstream did not say which digest: one GET by tag, stored by the digest of its bytes.
        return by_tag_without_digest(app, r, tag, accept, &key, head).await;
    };
    let media_type = header_str(resp.headers(), header::CONTENT_TYPE)
        .unwrap_or("")
        .to_string();
    // A HEAD response has no body: read the announced length, not the received one.
    let size = header_str(resp.headers(), header::CONTENT_LENGTH)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let record = TagRecord {
        digest: digest.to_string(),
        media_type,
        size,
    };
    if let Err(e) = store.put_tag(&ns, &r.repo, tag, &key, &record).await {
        tracing::warn!(error = %e, "could not record tag");
    }

    if head && store.stat(&digest).await.ok().flatten().is_none() {
        // Answer a HEAD miss with what upstream said; nothing to fetch yet.
        let mut out = Response::new(super::body::empty());
        for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH, header::ETAG] {
            copy_header(resp.headers(), out.headers_mut(), name);
        }
        out.headers_mut()
            .insert("docker-content-digest", header_value(&digest.to_string()));
        return Ok(out);
    }
    let served = fetch_by_digest(app, r, &digest, accept).await?;
    Ok(respond(&digest, served, head, None))
}

async fn by_tag_without_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
    key: &str,
    head: bool,
) -> Result<Response<Body>, RegistryError> {
    let client = app.upstream(r);
    let resp = match client
        .send(&manifest_request(r, tag.as_str(), Method::GET, accept))
        .await
    {
        Ok(resp) if resp.status() == StatusCode::OK => resp,
        Ok(resp) => {
            let e = upstream_error(&client.name, resp).await;
            return stale_or(app, r, tag, key, head, e).await;
        }
        Err(e) => return stale_or(app, r, tag, key, head, e).await,
    };
    let media_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_string);
    let bytes = read_limited(resp, MAX_MANIFEST)
        .await
        .map_err(|e| RegistryError::upstream_unavailable(&client.name, format!("manifest {}:{tag}: {e}", r.repo)))?;
    let digest = Digest::of(&bytes);
    let record = TagRecord {
        digest: digest.to_string(),
        media_type: media_type.clone().unwrap_or_default(),
        size: bytes.len() as u64,
    };
    let ns = app.namespace(r).to_string();
    if let Err(e) = app.cache.store().put_tag(&ns, &r.repo, tag, key, &record).await {
        tracing::warn!(error = %e, "could not record tag");
    }
    let length = Some(bytes.len() as u64);
    let body = bytes::Bytes::from(bytes);
    let served = app
        .cache
        .get_or_fetch(&digest, move || {
            Box::pin(async move {
                let body = futures_util::stream::once(async move { Ok(body) });
                Ok(Source {
                    media_type,
                    length,
                    body: Box::pin(body),
                })
            })
        })
        .await?;
    Ok(respond(&digest, served, head, None))
}

/// Upstream failed on a tag: serve the last digest seen for it when the
/// failure is upstream's (down, 5xx, 429); pass other answers (404, 401) on.
async fn stale_or(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    key: &str,
    head: bool,
    err: RegistryError,
) -> Result<Response<Body>, RegistryError> {
    if !err.is_upstream_failure() {
        return Err(err);
    }
    let ns = app.namespace(r);
    let store = app.cache.store();
    let Some(record) = store.get_tag(ns, &r.repo, tag, key).await.ok().flatten() else {
        return Err(err);
    };
    let Ok(digest) = Digest::parse(&record.digest) else {
        return Err(err);
    };
    let Some((reader, info)) = store.open(&digest).await.ok().flatten() else {
        return Err(err);
    };
    METRICS.stale_served.inc();
    tracing::warn!(tag = %tag, %digest, error = %err, "upstream failed; serving the cached tag");
    let served = Served::stored(reader, info);
    let warning = format!("110 regmirror \"Response is Stale: upstream {}\"", app.upstream(r).name);
    Ok(respond(&digest, served, head, Some(warning)))
}

/// The manifest response: stored bytes with their own media type, length,
/// digest and ETag; never converted.
fn respond(
    digest: &Digest,
    served: Served<crate::cache::LocalStore>,
    head: bool,
    warning: Option<String>,
) -> Response<Body> {
    let media_type = served
        .info
        .media_type
        .clone()
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
    let size = served.info.size;
    let mut resp = if head {
        Response::new(super::body::empty())
    } else {
        Response::new(stream(served.into_stream(0, None)))
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&media_type));
    if let Some(s) = size {
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
