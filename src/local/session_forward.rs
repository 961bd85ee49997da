//! An upload session lives in the replica that opened it (its file and its
//! running hash are there), and its id names that replica: `<tag>-<random>`,
//! the tag a short name of the replica's `[cluster] self`. A PATCH, PUT,
//! GET or DELETE of the session that lands on another replica (a load
//! balancer without affinity in front) is passed to the one that holds it,
//! its body streamed there and the answer streamed back, so a push may
//! spread over the replicas as a client's requests do.
//!
//! The request is admitted here first (the same logins on every replica),
//! then again by the holder, with the client's own `Authorization`. A
//! request from a peer is never passed on again.

use futures_util::TryStreamExt;
use http::{header, HeaderMap, Request, Response};
use url::Url;

use super::{uploads, PushBody};
use crate::cluster::PEER_HEADER;
use crate::registry::body::{stream, Body};
use crate::registry::errors::RegistryError;
use crate::registry::App;
use crate::route::UploadId;

/// Request headers the holder needs to serve the request as if it came
/// from the client.
const PASSED: [header::HeaderName; 5] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::ACCEPT,
];

/// The other member holding session `id`, when the request may be passed
/// to it: not for a peer's request, nor for an id no member's tag names
/// (then it is unknown here, as any id nobody opened).
pub fn held_elsewhere(app: &App, id: &UploadId, headers: &HeaderMap) -> Option<Url> {
    if headers.contains_key(PEER_HEADER) {
        return None;
    }
    let (tag, _) = id.as_str().split_once('-')?;
    app.cluster.as_ref()?.member_tagged(tag)
}

/// Passes `req` to `member` and answers with what it answered. A holder
/// that does not answer has lost the session with itself: the client is
/// told the upload is unknown, which makes it start the blob again.
pub async fn forward(
    app: &App,
    id: &UploadId,
    member: &Url,
    req: Request<PushBody>,
) -> Result<Response<Body>, RegistryError> {
    let cluster = app
        .cluster
        .as_ref()
        .ok_or_else(|| RegistryError::internal("forwarding an upload without [cluster]"))?;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = member
        .join(path)
        .map_err(|e| RegistryError::internal(format!("{member} + {path}: {e}")))?;
    let mut rb = cluster
        .client()
        .request(parts.method.clone(), url)
        .header(PEER_HEADER, cluster.sign(parts.method.as_str(), path));
    for name in PASSED {
        if let Some(v) = parts.headers.get(&name) {
            rb = rb.header(name, v.clone());
        }
    }
    let body = http_body_util::BodyDataStream::new(body);
    let resp = match rb.body(reqwest::Body::wrap_stream(body)).send().await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(upload = %id, replica = %member, error = %crate::upstream::error::error_chain(&e), "the replica holding an upload session did not answer");
            return Err(uploads::unknown(id));
        }
    };
    let mut out = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "date" | "server"
        ) {
            out = out.header(name, value);
        }
    }
    let answer = stream(resp.bytes_stream().map_err(std::io::Error::other));
    out.body(answer)
        .map_err(|e| RegistryError::internal(format!("answer of {member}: {e}")))
}
