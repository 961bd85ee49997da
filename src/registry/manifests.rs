//! `/v2/<name>/manifests/<reference>`.
//!
//! By digest: served from the store, fetched once on a miss, byte for byte
//! with its stored media type. By tag: upstream is asked with a HEAD
//! carrying the client's Accept (cheap, and not counted against Docker Hub's
//! pull limit); the answer's digest is then served from the store when
//! present. A tag this process has seen is asked conditionally
//! (`If-None-Match` with the digest it named): a 304 confirms it, and a
//! registry that ignores the header answers in full as before. When
//! upstream fails (unreachable, 5xx, 429) the last digest seen
//! for the tag is served with a `Warning: 110` header: records are kept per
//! media type upstream answered with, so a tag docker pulled is served stale
//! to podman or curl too, in the type the client's Accept prefers most among
//! those recorded.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response};

use super::body::{stream, Body};
use super::errors::{OciCode, RegistryError};
use super::outcome::RequestOutcome;
use super::owner::{Content, Forward};
use super::tag_asks::{Asking, TagAnswer, TagAsks, Turn};
use super::{copy_header, header_value, App};
use crate::auth::{Access, ContentKind, FetchPlan};
use crate::cache::{FetchError, Served, Source, TagRecord};
use crate::metrics::{TagSkipLabels, METRICS};
use crate::reference::{Digest, Reference, Tag};
use crate::route::RepoRequest;
use crate::upstream::{self, Credential, UpstreamRequest};

/// Sent upstream when the client names no manifest type.
const DEFAULT_ACCEPT: &str = crate::media_types::ALL_MANIFESTS;

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
    let forward = Forward::of(headers);
    match reference {
        Reference::Digest(d) => by_digest(app, r, d, &accept, head, access, &forward).await,
        Reference::Tag(t) => {
            if !crate::tag_policy::forces_check(headers) {
                if let Some(resp) = unasked(app, r, t, &accept, head, access, &forward).await? {
                    return Ok(resp);
                }
            }
            by_tag(app, r, t, &accept, head, access, &forward).await
        }
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

/// One media range of an Accept header: lower-cased type and its weight
/// (`q` times 1000, so 0 means "not acceptable").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptRange {
    pub media_type: String,
    pub weight: u16,
}

/// The media ranges of an Accept value in the client's order. Malformed
/// parts and weights are skipped or read as 1, never an error: the list
/// only ranks what regmirror has recorded.
pub fn parse_accept(accept: &str) -> Vec<AcceptRange> {
    accept
        .split(',')
        .filter_map(|part| {
            let mut params = part.split(';');
            let media_type = params.next()?.trim().to_ascii_lowercase();
            if media_type.is_empty() || !media_type.contains('/') {
                return None;
            }
            let mut weight = 1000;
            for p in params {
                if let Some((k, v)) = p.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        weight = v
                            .trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|q| q.is_finite())
                            .map_or(1000, |q| (q.clamp(0.0, 1.0) * 1000.0).round() as u16);
                    }
                }
            }
            Some(AcceptRange { media_type, weight })
        })
        .collect()
}

/// How much the client wants `media_type`: (weight, how early it named
/// it), from the most specific range that matches (RFC 9110, 12.5.1).
/// `None` when no range admits it or the matching range has q=0.
fn preference(ranges: &[AcceptRange], media_type: &str) -> Option<(u16, usize)> {
    let t = media_type.trim().to_ascii_lowercase();
    let major = t.split('/').next().unwrap_or("");
    let specificity = |r: &AcceptRange| {
        if r.media_type == t {
            Some(2)
        } else if r.media_type.strip_suffix("/*") == Some(major) {
            Some(1)
        } else if r.media_type == "*/*" {
            Some(0)
        } else {
            None
        }
    };
    let (pos, best) = ranges
        .iter()
        .enumerate()
        .filter_map(|(i, r)| specificity(r).map(|s| (s, i, r)))
        .max_by_key(|(s, i, _)| (*s, std::cmp::Reverse(*i)))
        .map(|(_, i, r)| (i, r))?;
    (best.weight > 0).then_some((best.weight, pos))
}

/// The records a client with this Accept may be served, most wanted first:
/// highest q, then the range it named first, then the newest answer.
pub fn admissible(records: Vec<TagRecord>, accept: &str) -> Vec<TagRecord> {
    let ranges = parse_accept(accept);
    let mut ranked: Vec<((u16, usize), TagRecord)> = records
        .into_iter()
        .filter_map(|r| preference(&ranges, &r.media_type).map(|p| (p, r)))
        .collect();
    ranked.sort_by(|((wa, pa), a), ((wb, pb), b)| wb.cmp(wa).then(pa.cmp(pb)).then(b.seen_ms.cmp(&a.seen_ms)));
    ranked.into_iter().map(|(_, r)| r).collect()
}

/// A media type as upstream's `Content-Type` names it, without parameters;
/// `None` when it names none.
fn media_type_of(content_type: Option<&str>) -> Option<String> {
    let t = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    (!t.is_empty() && t != "application/octet-stream").then_some(t)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    forward: &Forward,
) -> Result<Response<Body>, RegistryError> {
    let manifest = fetch_by_digest(app, r, d, accept, access, forward, false).await?;
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
    forward: &Forward,
    proven_public: bool,
) -> Result<Manifest, RegistryError> {
    let plan = access
        .content(&app.cache, d, ContentKind::Manifest, proven_public)
        .await
        .map_err(|e| manifest_unknown(e, d))?;
    let served = fetch_served(app, r, d, accept, &plan, forward).await?;
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

/// The manifest from the store, or the one download of it: from its owner
/// when another replica owns it (see [`Forward`]), else (or when the owner
/// does not serve it) from upstream.
async fn fetch_served(
    app: &Arc<App>,
    r: &RepoRequest,
    d: &Digest,
    accept: &str,
    plan: &FetchPlan,
    forward: &Forward,
) -> Result<Served, RegistryError> {
    let (app2, r2, d2, accept) = (app.clone(), r.clone(), d.clone(), accept.to_string());
    let (credential, public) = (plan.credential.clone(), plan.public);
    let owner = forward.owner(app, d);
    app.cache
        .get_or_fetch(d, move |offset| {
            let (app2, r2, d2, owner, accept) = (app2.clone(), r2.clone(), d2.clone(), owner.clone(), accept.clone());
            let req = manifest_request(&r2, &d2.to_string(), Method::GET, &accept, credential.clone());
            Box::pin(async move {
                if let Some(owner) = owner {
                    let what = Content::Manifest {
                        accept: &accept,
                        max_len: MAX_MANIFEST as u64,
                    };
                    if let Some(source) = owner.open(&app2, &r2, &d2, what, offset).await {
                        return Ok(Source { public, ..source });
                    }
                }
                super::open_source(&app2, &r2, &req, offset, &d2, Some(MAX_MANIFEST as u64), public).await
            })
        })
        .await
        .map_err(|e| manifest_unknown(e.into(), d))
}

/// The tag answered from the store without asking upstream, when the
/// upstream's tag policy allows it for this tag (confirmed within
/// `tag_check_interval`, or immutable) and the client may be served the
/// recorded answer (the same rule as for a stale one: a private answer only
/// to a client whose token upstream accepted here lately). `None`: ask.
async fn unasked(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
    head: bool,
    access: &Access<'_>,
    forward: &Forward,
) -> Result<Option<Response<Body>>, RegistryError> {
    let upstream = app.upstream(r);
    let rules = upstream.config.tag_policy.rules(r.repo.as_str());
    if rules.always_asks() {
        return Ok(None);
    }
    // What this process confirmed lately, else what the store keeps (after
    // a restart, an immutable tag still needs no question).
    let mut records = app.cache.recent_tags(app.repo_key(r), tag);
    if records.is_empty() {
        records = app.cache.last_tags(app.repo_key(r), tag).await;
    }
    let now = now_ms();
    for record in admissible(records, accept) {
        let Some(why) = rules.unasked(tag.as_str(), record.seen_ms, now) else {
            continue;
        };
        if !access.may_read_recorded(record.public) {
            continue;
        }
        let Ok(digest) = Digest::parse(&record.digest) else {
            continue;
        };
        // Served for as long as it is stored; once evicted, upstream says
        // again what the tag names.
        if app.cache.stat(&digest).await.ok().flatten().is_none() {
            continue;
        }
        let manifest = fetch_by_digest(app, r, &digest, accept, access, forward, false).await?;
        METRICS
            .tag_checks_skipped
            .get_or_create(&TagSkipLabels {
                upstream: upstream.name().to_string(),
                reason: why.as_str(),
            })
            .inc();
        tracing::debug!(upstream = %upstream.name(), repo = %r.repo, %tag, %digest, reason = why.as_str(), "tag answered without asking upstream");
        return Ok(Some(respond(&digest, manifest, head, None)));
    }
    Ok(None)
}

/// Serves the answer another request for the tag just had from upstream.
async fn serve_answer(
    app: &Arc<App>,
    r: &RepoRequest,
    accept: &str,
    head: bool,
    access: &Access<'_>,
    forward: &Forward,
    answer: TagAnswer,
) -> Result<Response<Body>, RegistryError> {
    let TagAnswer { digest, record } = answer;
    if head && app.cache.stat(&digest).await.ok().flatten().is_none() {
        // As the asker answered its HEAD: what upstream said, nothing fetched.
        let mut out = Response::new(super::body::empty());
        let h = out.headers_mut();
        h.insert(header::CONTENT_TYPE, header_value(&record.media_type));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(record.size));
        h.insert("docker-content-digest", header_value(digest.as_str()));
        h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
        return Ok(out);
    }
    let manifest = fetch_by_digest(app, r, &digest, accept, access, forward, true).await?;
    Ok(respond(&digest, manifest, head, None))
}

/// Upstream's answer to a tag HEAD.
enum Asked {
    /// 304: the tag still names the digest of this record.
    Same(Digest, TagRecord),
    New(upstream::Response),
}

async fn by_tag(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
    head: bool,
    access: &Access<'_>,
    forward: &Forward,
) -> Result<Response<Body>, RegistryError> {
    // Anonymous requests for one tag at once: one asks, the others serve
    // its answer (see `tag_asks`).
    let mut asking = None;
    if access.answers_are_public() {
        let key = (
            app.upstream(r).name().to_string(),
            r.repo.to_string(),
            tag.as_str().to_string(),
            accept.to_string(),
        );
        match app.tag_asks.turn(key) {
            Turn::Ask(a) => asking = Some(a),
            Turn::Wait(rx) => {
                if let Some(answer) = TagAsks::wait(rx).await {
                    access.note_public();
                    return serve_answer(app, r, accept, head, access, forward, answer).await;
                }
            }
        }
    }
    let share = |asking: Option<Asking<'_>>, digest: &Digest, record: &TagRecord| {
        if let Some(a) = asking {
            a.answer(Some(TagAnswer {
                digest: digest.clone(),
                record: record.clone(),
            }));
        }
    };
    let client = &app.upstream(r).client;

    // The answer upstream gave this Accept last time, if this process saw
    // it: asked whether it still holds (`If-None-Match` with its ETag), a
    // registry answers 304 after looking the tag up, without reading and
    // checking the manifest again. Any other answer is a full one.
    let known = admissible(app.cache.recent_tags(app.repo_key(r), tag), accept)
        .into_iter()
        .find_map(|record| Some((Digest::parse(&record.digest).ok()?, record)));
    let mut ask = manifest_request(r, tag.as_str(), Method::HEAD, accept, access.credential());
    if let Some((digest, _)) = &known {
        ask.headers
            .insert(header::IF_NONE_MATCH, header_value(&format!("\"{digest}\"")));
    }
    let asked = match (client.send(&ask).await, known) {
        (Ok(resp), Some((digest, record))) if resp.status() == http::StatusCode::NOT_MODIFIED => {
            Ok(Asked::Same(digest, record))
        }
        (Ok(resp), _) => resp.ok().await.map(Asked::New),
        (Err(e), _) => Err(e),
    };
    let resp = match asked {
        Ok(Asked::New(resp)) => resp,
        Ok(Asked::Same(digest, record)) => {
            access.note_public();
            // Still upstream's answer: recorded as given now (its time, and
            // to whom it may be served stale), then served like a new one.
            let record = TagRecord {
                public: access.answers_are_public(),
                seen_ms: now_ms(),
                ..record
            };
            app.cache.record_tag(app.repo_key(r), tag, &record).await;
            share(asking, &digest, &record);
            let manifest =
                fetch_by_digest(app, r, &digest, accept, access, forward, access.answers_are_public()).await?;
            return Ok(respond(&digest, manifest, head, None));
        }
        Err(e) => return stale_or(app, r, tag, accept, head, e, access).await,
    };
    access.note_public();

    let digest = resp.header("docker-content-digest").and_then(|v| Digest::parse(v).ok());
    let Some(digest) = digest else {
        // Upstream did not say which digest: one GET by tag, stored by the digest of its bytes.
        return by_tag_without_digest(app, r, tag, accept, head, access).await;
    };
    // A HEAD response has no body: read the announced length, not the received one.
    let size = resp
        .header(header::CONTENT_LENGTH)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if let Some(media_type) = media_type_of(resp.header(header::CONTENT_TYPE)) {
        let record = TagRecord {
            digest: digest.to_string(),
            media_type,
            size,
            public: access.answers_are_public(),
            seen_ms: now_ms(),
        };
        app.cache.record_tag(app.repo_key(r), tag, &record).await;
        share(asking, &digest, &record);
    }

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
    let manifest = fetch_by_digest(app, r, &digest, accept, access, forward, access.answers_are_public()).await?;
    Ok(respond(&digest, manifest, head, None))
}

async fn by_tag_without_digest(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
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
        Err(e) => return stale_or(app, r, tag, accept, head, e, access).await,
    };
    let public = access.answers_are_public();
    let media_type = media_type_of(resp.header(header::CONTENT_TYPE));
    let bytes = resp.bytes(MAX_MANIFEST, &format!("manifest {}:{tag}", r.repo)).await?;
    let digest = Digest::of(&bytes);
    if let Some(media_type) = &media_type {
        let record = TagRecord {
            digest: digest.to_string(),
            media_type: media_type.clone(),
            size: bytes.len() as u64,
            public,
            seen_ms: now_ms(),
        };
        app.cache.record_tag(app.repo_key(r), tag, &record).await;
    }
    let length = Some(bytes.len() as u64);
    let served = app
        .cache
        // In memory already: every opening, a resume included, is all of it.
        .get_or_fetch(&digest, move |_| {
            let (bytes, media_type) = (bytes.clone(), media_type.clone());
            Box::pin(async move {
                let body = futures_util::stream::once(async move { Ok(bytes) });
                Ok(Source {
                    stored_by_sender: false,
                    media_type,
                    length,
                    max_len: None,
                    public,
                    start: 0,
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

/// Upstream failed on a tag: when the failure is upstream's (down, 5xx,
/// 429), serve the recorded answer the client's Accept admits, its most
/// preferred type first, skipping any whose manifest is no longer stored;
/// pass other answers (404, 401) on.
async fn stale_or(
    app: &Arc<App>,
    r: &RepoRequest,
    tag: &Tag,
    accept: &str,
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
    let records = admissible(app.cache.last_tags(app.repo_key(r), tag).await, accept);
    let mut found = None;
    for record in records {
        if !access.may_read_recorded(record.public) {
            continue;
        }
        let Ok(digest) = Digest::parse(&record.digest) else {
            continue;
        };
        let stored = app.cache.open_stored(&digest).await.ok().flatten();
        if let Some(m) = stored.and_then(Manifest::from_served) {
            found = Some((digest, m));
            break;
        }
    }
    let Some((digest, manifest)) = found else {
        return Err(refuse(err));
    };
    tracing::warn!(upstream = %app.upstream(r).name(), repo = %r.repo, tag = %tag, %digest, error = %err, "upstream failed; serving the cached tag");
    let warning = format!(
        "110 regmirror \"Response is Stale: upstream {}\"",
        app.upstream(r).name()
    );
    let mut resp = respond(&digest, manifest, head, Some(warning));
    RequestOutcome::Stale.mark(&mut resp);
    Ok(resp)
}

/// The manifest response: stored bytes with their own media type, length,
/// digest and ETag; never converted.
fn respond(digest: &Digest, manifest: Manifest, head: bool, warning: Option<String>) -> Response<Body> {
    let outcome = match &manifest.body {
        ManifestBody::Served(served) => RequestOutcome::from(served.info.lookup),
        ManifestBody::Fetched(_) => RequestOutcome::Miss,
    };
    let mut resp = match (head, manifest.body) {
        (true, _) => Response::new(super::body::empty()),
        (false, ManifestBody::Served(served)) => match served.in_memory() {
            Some(bytes) => Response::new(super::body::full(bytes)),
            None => Response::new(stream(served.into_stream(0, None))),
        },
        (false, ManifestBody::Fetched(bytes)) => Response::new(super::body::full(bytes)),
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&manifest.media_type));
    if let Some(s) = manifest.size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(s));
    }
    h.insert("docker-content-digest", header_value(digest.as_str()));
    h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    if let Some(w) = warning {
        h.insert(header::WARNING, header_value(&w));
    }
    outcome.mark(&mut resp);
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

    fn rec(t: &str, seen_ms: u64) -> TagRecord {
        TagRecord {
            digest: Digest::of(t.as_bytes()).to_string(),
            media_type: t.into(),
            size: 1,
            public: true,
            seen_ms,
        }
    }

    fn picked(records: &[TagRecord], accept: &str) -> Vec<String> {
        admissible(records.to_vec(), accept)
            .into_iter()
            .map(|r| r.media_type)
            .collect()
    }

    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
    const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
    const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

    #[test]
    fn stale_records_follow_the_clients_preference() {
        let records = [rec(DOCKER_LIST, 1), rec(OCI_INDEX, 2), rec(DOCKER, 3)];
        assert_eq!(picked(&records, OCI), Vec::<String>::new(), "nothing admissible");
        assert_eq!(picked(&records, DOCKER), vec![DOCKER]);
        assert_eq!(
            picked(&records, &format!("{DOCKER_LIST}, {OCI_INDEX}")),
            vec![DOCKER_LIST, OCI_INDEX],
            "equal q: the client's order"
        );
        assert_eq!(
            picked(&records, &format!("{DOCKER_LIST};q=0.5, {OCI_INDEX}")),
            vec![OCI_INDEX, DOCKER_LIST],
            "q before order"
        );
        assert_eq!(
            picked(&records, &format!("{OCI_INDEX};q=0, application/*")),
            vec![DOCKER, DOCKER_LIST],
            "q=0 refuses a type a wildcard would admit; ties go to the newest"
        );
        assert_eq!(picked(&records, DEFAULT_ACCEPT), vec![OCI_INDEX, DOCKER_LIST, DOCKER]);
        assert_eq!(
            picked(&records, "APPLICATION/VND.DOCKER.DISTRIBUTION.MANIFEST.V2+JSON ; Q=0.9"),
            vec![DOCKER],
            "case and spacing do not matter"
        );
    }

    #[test]
    fn malformed_accept_values_rank_nothing_and_never_panic() {
        for junk in ["", ",,;", ";q=", "a/b;q=nan", "x;q=2", "*/*;q=-1", "\u{0}/\u{0}"] {
            let _ = parse_accept(junk);
            let _ = admissible(vec![rec(OCI, 1)], junk);
        }
        assert_eq!(parse_accept("a/b;q=7")[0].weight, 1000, "q is capped at 1");
        assert_eq!(parse_accept("a/b;q=zz")[0].weight, 1000);
    }
}
