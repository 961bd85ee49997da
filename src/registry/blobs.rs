//! `/v2/<name>/blobs/<digest>`: layers and configs.
//!
//! GET serves from the store or joins the single download of a missing
//! digest, with Range support either way (a range on a miss is cut from the
//! download as it grows). HEAD answers from the store, or asks upstream with
//! a HEAD on a miss; it never 404s just because the blob is not cached. An
//! upstream 404 to that HEAD is confirmed with a GET (which starts the
//! download the client's GET will join): a cache chained upstream (Harbor,
//! Artifactory, another regmirror) may answer 404 to a HEAD of a blob it
//! has not fetched yet but serve the GET.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::body::{empty, stream, Body};
use super::errors::{OciCode, RegistryError};
use super::outcome::RequestOutcome;
use super::owner::{Content, Forward};
use super::range::{parse_range, ByteRange};
use super::{copy_header, header_value, App};
use crate::auth::{Access, ContentKind, FetchPlan};
use crate::cache::{Served, Source};
use crate::reference::Digest;
use crate::route::RepoRequest;
use crate::upstream::{Credential, UpstreamRequest};

pub async fn serve(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    headers: &HeaderMap,
    head: bool,
    access: &Access<'_>,
) -> Result<Response<Body>, RegistryError> {
    let plan = access
        .content(&app.cache, d, ContentKind::Blob, false)
        .await
        .map_err(|e| blob_error(e, d))?;
    let forward = Forward::of(headers);
    if head {
        return head_blob(app, r, d, &plan, &forward).await;
    }
    let served = fetch(app, r, d, &plan, &forward).await?;
    Ok(respond(served, headers, d))
}

/// The answer to a GET of a blob being served: the whole of it, or the
/// range the client asked for (206), or 416.
pub(crate) fn respond(served: Served, headers: &HeaderMap, d: &Digest) -> Response<Body> {
    let outcome = RequestOutcome::from(served.info.lookup);
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut resp = match (served.info.size, range) {
        (Some(size), Some(_)) => match parse_range(range, size) {
            ByteRange::Unsatisfiable => {
                let mut resp = RegistryError::range_not_satisfiable(size).into_response();
                resp.headers_mut()
                    .insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
                return resp;
            }
            ByteRange::Partial { first, last } => {
                let mut resp = Response::new(stream(served.into_stream(first, Some(last + 1))));
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                let h = resp.headers_mut();
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(last + 1 - first));
                h.insert(
                    header::CONTENT_RANGE,
                    header_value(&format!("bytes {first}-{last}/{size}")),
                );
                resp
            }
            ByteRange::Full => full_response(served, Some(size)),
        },
        (size, _) => full_response(served, size),
    };
    identify(resp.headers_mut(), d);
    outcome.mark(&mut resp);
    resp
}

fn full_response(served: Served, size: Option<u64>) -> Response<Body> {
    let mut resp = Response::new(stream(served.into_stream(0, None)));
    if let Some(s) = size {
        resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(s));
    }
    resp
}

/// The blob from the store, or the one download of it (started or joined):
/// from its owner when another replica owns it (see [`Forward`]), else (or
/// when the owner does not serve it) from upstream.
async fn fetch(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    plan: &FetchPlan,
    forward: &Forward,
) -> Result<Served, RegistryError> {
    let (app2, r2, d2) = (app.clone(), r.clone(), d.clone());
    let (credential, public) = (plan.credential.clone(), plan.public);
    let owner = forward.owner(app, d);
    app.cache
        .get_or_fetch(d, move |offset| {
            let (app2, r2, d2, owner) = (app2.clone(), r2.clone(), d2.clone(), owner.clone());
            let req = blob_request(&r2, &d2, Method::GET, credential.clone());
            Box::pin(async move {
                if let Some(owner) = owner {
                    if let Some(source) = owner.open(&app2, &r2, &d2, Content::Blob, offset).await {
                        return Ok(Source { public, ..source });
                    }
                }
                let mut source = super::open_source(&app2, &r2, &req, offset, &d2, None, public).await?;
                // Layers are opaque bytes; whatever upstream called them.
                source.media_type = None;
                Ok(source)
            })
        })
        .await
        .map_err(|e| blob_error(e.into(), d))
}

async fn head_blob(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    plan: &FetchPlan,
    forward: &Forward,
) -> Result<Response<Body>, RegistryError> {
    let mut resp = Response::new(empty());
    if let Some(size) = app.cache.stat(d).await?.map(|i| i.size).or(plan.upstream_length) {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    } else {
        let asked = app
            .upstream(r)
            .client
            .get_ok(&blob_request(r, d, Method::HEAD, plan.credential.clone()))
            .await;
        match asked {
            Ok(up) => copy_header(up.headers(), resp.headers_mut(), header::CONTENT_LENGTH),
            Err(e) if e.is_not_found() => {
                // Confirmed only by a GET: the download the client's next
                // request joins. Still a 404 when that says so too.
                tracing::debug!(digest = %d, "upstream HEAD said 404; confirming with a GET");
                let served = fetch(app, r, d, plan, forward).await?;
                if let Some(size) = served.info.size {
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
                }
            }
            Err(e) => return Err(blob_error(e.into(), d)),
        }
    }
    identify(resp.headers_mut(), d);
    Ok(resp)
}

fn blob_request(r: &RepoRequest, d: &Digest, method: Method, credential: Credential) -> UpstreamRequest {
    UpstreamRequest {
        method,
        path: format!("/v2/{}/blobs/{d}", r.repo),
        query: None,
        headers: HeaderMap::new(),
        scope: format!("repository:{}:pull", r.repo),
        credential,
    }
}

fn blob_error(e: RegistryError, d: &Digest) -> RegistryError {
    e.when_not_found(OciCode::BlobUnknown, format!("blob unknown: {d}"))
}

/// The headers GET and HEAD of a blob share (rule 4: HEAD answers like GET).
pub(crate) fn identify(h: &mut HeaderMap, d: &Digest) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("docker-content-digest", header_value(&d.to_string()));
    h.insert(header::ETAG, header_value(&format!("\"{d}\"")));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}
