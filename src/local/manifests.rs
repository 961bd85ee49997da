//! Manifests of local repositories: pushed by tag or by digest, served
//! byte-for-byte with the media type they were pushed with.
//!
//! A manifest is accepted only when everything it references is there: its
//! config and layers readable in the repository (pushed, mounted, or public
//! in the cache), the manifests of an index pushed to the repository. A
//! manifest with a `subject` is recorded as a referrer of that subject
//! (OCI 1.1), which need not exist yet.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::{link, readable, store_error, PushBody};
use crate::cache::Link;
use crate::metrics::METRICS;
use crate::reference::{Digest, Hasher, Reference, RepoName};
use crate::registry::body::{stream, Body};
use crate::registry::errors::{OciCode, RegistryError};
use crate::registry::{header_value, App};
use crate::route::LocalRequest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The most a pushed manifest may be (the spec asks registries to take at
/// least 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;

fn unknown(reference: &Reference) -> RegistryError {
    RegistryError::new(
        StatusCode::NOT_FOUND,
        OciCode::ManifestUnknown,
        format!("manifest unknown: {reference}"),
    )
}

fn invalid(message: impl Into<String>) -> RegistryError {
    RegistryError::new(StatusCode::BAD_REQUEST, OciCode::ManifestInvalid, message)
}

/// The digest a reference stands for in `repo`, when it does.
async fn resolve(app: &App, repo: &RepoName, reference: &Reference) -> Result<Option<Digest>, RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    match reference {
        Reference::Tag(t) => store.tag(repo, t).await.map_err(store_error),
        Reference::Digest(d) => Ok(store
            .linked(repo, Link::Manifest, d)
            .await
            .map_err(store_error)?
            .then(|| d.clone())),
    }
}

pub async fn get(
    app: &App,
    repo: &RepoName,
    reference: &Reference,
    head: bool,
) -> Result<Response<Body>, RegistryError> {
    let d = resolve(app, repo, reference).await?.ok_or_else(|| unknown(reference))?;
    let served = app.cache.open_stored(&d).await?.ok_or_else(|| unknown(reference))?;
    let media_type = served
        .info
        .media_type
        .clone()
        .unwrap_or_else(|| "application/octet-stream".into());
    let size = served.info.size;
    let mut resp = Response::new(if head {
        crate::registry::body::empty()
    } else {
        stream(served.into_stream(0, None))
    });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&media_type));
    if let Some(size) = size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    h.insert("docker-content-digest", header_value(d.as_str()));
    h.insert(header::ETAG, header_value(&format!("\"{d}\"")));
    Ok(resp)
}

/// What a manifest references, read from its JSON.
#[derive(Debug, Default, PartialEq)]
pub struct References {
    pub blobs: Vec<Digest>,
    pub manifests: Vec<Digest>,
    pub subject: Option<Digest>,
    /// The manifest's `artifactType`, else its config's media type.
    pub artifact_type: Option<String>,
    pub annotations: Option<serde_json::Value>,
    pub media_type: Option<String>,
}

fn descriptor_digest(v: &serde_json::Value, field: &str) -> Result<Digest, RegistryError> {
    let d = v
        .get("digest")
        .and_then(|d| d.as_str())
        .ok_or_else(|| invalid(format!("{field}: a descriptor without a digest")))?;
    Digest::parse(d).map_err(|e| invalid(format!("{field}: {e}")))
}

/// Parses a manifest or index far enough to know what it references.
pub fn references(body: &[u8]) -> Result<References, RegistryError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the manifest is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(invalid("the manifest is not a JSON object"));
    }
    let mut out = References {
        media_type: v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string),
        annotations: v.get("annotations").cloned(),
        ..Default::default()
    };
    if let Some(config) = v.get("config") {
        out.blobs.push(descriptor_digest(config, "config")?);
        out.artifact_type = config.get("mediaType").and_then(|m| m.as_str()).map(str::to_string);
    }
    for field in ["layers", "blobs"] {
        if let Some(list) = v.get(field) {
            let list = list
                .as_array()
                .ok_or_else(|| invalid(format!("{field} is not a list")))?;
            for l in list {
                // Foreign layers live at their own URLs, not in a registry.
                if l.get("urls")
                    .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
                {
                    continue;
                }
                out.blobs.push(descriptor_digest(l, field)?);
            }
        }
    }
    if let Some(list) = v.get("manifests") {
        let list = list.as_array().ok_or_else(|| invalid("manifests is not a list"))?;
        for m in list {
            out.manifests.push(descriptor_digest(m, "manifests")?);
        }
    }
    if let Some(s) = v.get("subject") {
        out.subject = Some(descriptor_digest(s, "subject")?);
    }
    if let Some(t) = v.get("artifactType").and_then(|t| t.as_str()) {
        out.artifact_type = Some(t.to_string());
    }
    if v.get("config").is_none() && v.get("manifests").is_none() && v.get("blobs").is_none() {
        return Err(invalid(
            "neither an image manifest (config, layers) nor an index (manifests)",
        ));
    }
    Ok(out)
}

async fn read_body(mut body: PushBody) -> Result<Bytes, RegistryError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| invalid(format!("the manifest body broke off: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > MAX_MANIFEST {
            return Err(RegistryError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                OciCode::SizeInvalid,
                format!("a manifest may be at most {MAX_MANIFEST} bytes"),
            ));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

pub async fn put(
    app: &App,
    r: &LocalRequest,
    reference: &Reference,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .filter(|v| !v.is_empty());
    let body = read_body(req.into_body()).await?;
    let d = match reference {
        Reference::Digest(want) => {
            let mut h = Hasher::new(want.algorithm());
            h.update(&body);
            let got = h.finish();
            if got != *want {
                return Err(RegistryError::new(
                    StatusCode::BAD_REQUEST,
                    OciCode::DigestInvalid,
                    format!("the manifest hashes to {got}, not {want}"),
                ));
            }
            got
        }
        Reference::Tag(_) => Digest::of(&body),
    };
    let refs = references(&body)?;
    let media_type = content_type
        .or_else(|| refs.media_type.clone())
        .ok_or_else(|| invalid("no Content-Type and no mediaType in the manifest"))?;
    let store = app.cache.hosted().map_err(store_error)?;
    let mut blobs = Vec::new();
    for b in &refs.blobs {
        match readable(app, &r.repo, b).await? {
            Some(info) => blobs.push((b.clone(), info.size)),
            None => return Err(missing(b, "blob")),
        }
    }
    for m in &refs.manifests {
        if !store.linked(&r.repo, Link::Manifest, m).await.map_err(store_error)? {
            return Err(missing(m, "manifest"));
        }
    }
    if !super::fits(app, r, body.len() as u64).await {
        return Err(super::over_quota(app, r));
    }
    let size = body.len() as u64;
    app.cache
        .store_manifest(&d, body, &media_type)
        .await
        .map_err(|e| RegistryError::internal(format!("cannot store manifest {d}: {e}")))?;
    // Content the manifest uses stays as long as the manifest does.
    for (b, size) in &blobs {
        link(app, r, Link::Blob, b, *size).await?;
    }
    link(app, r, Link::Manifest, &d, size).await?;
    if let Some(subject) = &refs.subject {
        let mut desc = serde_json::json!({
            "mediaType": media_type,
            "digest": d.as_str(),
            "size": size,
        });
        if let Some(t) = &refs.artifact_type {
            desc["artifactType"] = serde_json::Value::String(t.clone());
        }
        if let Some(a) = &refs.annotations {
            desc["annotations"] = a.clone();
        }
        store
            .add_referrer(&r.repo, subject, &d, desc.to_string().as_bytes())
            .await
            .map_err(store_error)?;
    }
    if let Reference::Tag(t) = reference {
        store.set_tag(&r.repo, t, &d).await.map_err(store_error)?;
    }
    METRICS.pushed_manifests.inc();
    if crate::events::wanted(crate::events::Kind::Push) {
        let mut event = crate::events::Event::new(crate::events::Kind::Push);
        event.repository = Some(r.repo.to_string());
        event.reference = Some(reference.to_string());
        event.digest = Some(d.to_string());
        event.media_type = Some(media_type.clone());
        event.size = Some(size);
        crate::events::emit(event);
    }
    tracing::info!(repo = %r.repo, reference = %reference, digest = %d, "manifest pushed");
    let mut resp = Response::new(crate::registry::body::empty());
    *resp.status_mut() = StatusCode::CREATED;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&format!("/v2/{}/manifests/{d}", r.repo)));
    h.insert("docker-content-digest", header_value(d.as_str()));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    if let Some(subject) = &refs.subject {
        h.insert("oci-subject", header_value(subject.as_str()));
    }
    Ok(resp)
}

fn missing(d: &Digest, what: &str) -> RegistryError {
    RegistryError::new(
        StatusCode::BAD_REQUEST,
        OciCode::ManifestBlobUnknown,
        format!("the manifest references {what} {d}, which this repository does not hold: push it first"),
    )
    .with_detail(serde_json::json!({ "digest": d.as_str() }))
}

pub async fn delete(app: &App, r: &LocalRequest, reference: &Reference) -> Result<Response<Body>, RegistryError> {
    let store = app.cache.hosted().map_err(store_error)?;
    match reference {
        Reference::Tag(t) => {
            if !store.delete_tag(&r.repo, t).await.map_err(store_error)? {
                return Err(unknown(reference));
            }
            tracing::info!(repo = %r.repo, tag = %t, "tag deleted");
        }
        Reference::Digest(d) => {
            if !store.unlink(&r.repo, Link::Manifest, d).await.map_err(store_error)? {
                return Err(unknown(reference));
            }
            // Its content is collectable now (`regmirror cache gc`).
            store.link(&r.repo, Link::Deleted, d).await.map_err(store_error)?;
            for (t, at) in store.tags(&r.repo).await.map_err(store_error)? {
                if at == *d {
                    store.delete_tag(&r.repo, &t).await.map_err(store_error)?;
                }
            }
            if let Ok(Some(served)) = app.cache.open_stored(d).await {
                if let Some(bytes) = served.in_memory() {
                    if let Ok(Some(subject)) = references(&bytes).map(|r| r.subject) {
                        store.remove_referrer(&r.repo, &subject, d).await.map_err(store_error)?;
                    }
                }
            }
            app.hosted.usage.recount(r.namespace);
            tracing::info!(repo = %r.repo, digest = %d, "manifest deleted");
        }
    }
    let mut resp = Response::new(crate::registry::body::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    Ok(resp)
}
