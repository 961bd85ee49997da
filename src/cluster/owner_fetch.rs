//! The asking side of a cold digest another replica owns: the owner's
//! answer as a download source, so this replica's single flight streams it
//! to its clients (and verifies it) exactly as it would upstream's. A
//! download from the owner that breaks off is resumed like any other, by
//! asking again from the offset reached: the owner if it answers, else
//! upstream.

use std::io;

use futures_util::TryStreamExt;
use http::{header, HeaderValue, StatusCode};
use url::Url;

use super::{Cluster, PEER_HEADER};
use crate::cache::Source;

/// How long the owner may take to answer once it took the connection: it
/// answers when upstream does (its own download), so this is upstream's
/// time to first byte, not the owner's.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Why the owner did not serve it; the caller fetches from upstream.
#[derive(Debug, thiserror::Error)]
#[error("owner {owner}: {reason}")]
pub struct OwnerError {
    pub owner: String,
    pub reason: String,
}

/// GETs `path` (a `/v2/…/blobs/<digest>` or `…/manifests/<digest>` path
/// on the owner's plain listener) from byte `offset` on, signed, with the
/// client's `authorization` (the owner decides access and provenance as for
/// the client itself) and, for a manifest, its `accept`. The source's media
/// type is the owner's `Content-Type`.
pub async fn open(
    cluster: &Cluster,
    owner: &Url,
    path: &str,
    offset: u64,
    authorization: Option<&HeaderValue>,
    accept: Option<&str>,
) -> Result<Source, OwnerError> {
    let fail = |reason: String| OwnerError {
        owner: owner.to_string(),
        reason,
    };
    let url = owner.join(path).map_err(|e| fail(format!("{path}: {e}")))?;
    let mut req = cluster.client().get(url).header(PEER_HEADER, cluster.sign("GET", path));
    if offset > 0 {
        req = req.header(header::RANGE, format!("bytes={offset}-"));
    }
    if let Some(a) = authorization {
        req = req.header(header::AUTHORIZATION, a.clone());
    }
    if let Some(a) = accept.and_then(|a| HeaderValue::from_str(a).ok()) {
        req = req.header(header::ACCEPT, a);
    }
    let resp = tokio::time::timeout(ANSWER_WAIT, req.send())
        .await
        .map_err(|_| fail(format!("no answer within {ANSWER_WAIT:?}")))?
        .map_err(|e| fail(crate::upstream::error::error_chain(&e)))?;
    let start = match resp.status() {
        StatusCode::OK => 0,
        StatusCode::PARTIAL_CONTENT => {
            let start = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::upstream::client::content_range_start);
            if start != Some(offset) {
                return Err(fail(format!("asked from byte {offset}, got {start:?}")));
            }
            offset
        }
        s => return Err(fail(format!("answered {s}"))),
    };
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Source {
        stored_by_sender: true,
        media_type,
        length: resp.content_length(),
        max_len: None,
        public: false,
        start,
        body: Box::pin(resp.bytes_stream().map_err(io::Error::other)),
    })
}
