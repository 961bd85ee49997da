//! An upstream answer, and the only code that reads upstream bodies: whole
//! (bounded), as a byte stream for the cache, or turned into an [`Error`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http::{header, HeaderMap, StatusCode};

use super::error::{error_chain, Error, OciBody, Phase};
use super::health::Health;

/// Error bodies are short; more than this is not read.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Upstream's response to one request, with the upstream it came from so
/// that every error it turns into names that upstream.
pub struct Response {
    upstream: String,
    inner: reqwest::Response,
    idle_timeout: Duration,
    /// The health of the URL that answered: a body that breaks later is
    /// that URL's failure. `None` for answers of token realms.
    health: Option<Arc<Health>>,
}

impl Response {
    pub(crate) fn new(
        upstream: &str,
        inner: reqwest::Response,
        idle_timeout: Duration,
        health: Option<Arc<Health>>,
    ) -> Self {
        Response {
            upstream: upstream.to_string(),
            inner,
            idle_timeout,
            health,
        }
    }

    /// A body that stalled is the URL's failure (back off: the next try
    /// goes elsewhere); one that broke off is noted only.
    fn body_failed(&self, why: &str, stalled: bool) {
        match &self.health {
            Some(h) if stalled => h.failure(why, None),
            Some(h) => h.note(why),
            None => {}
        }
    }

    /// The configured name of the upstream that answered.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    pub fn status(&self) -> StatusCode {
        self.inner.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.inner.headers()
    }

    pub fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.inner.headers().get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_length(&self) -> Option<u64> {
        self.inner.content_length()
    }

    /// The response when upstream answered 200, else what went wrong.
    pub async fn ok(self) -> Result<Response, Error> {
        if self.status() == StatusCode::OK {
            Ok(self)
        } else {
            Err(self.into_error().await)
        }
    }

    /// A non-success answer as an error, keeping upstream's OCI body,
    /// `Retry-After` and challenge.
    pub async fn into_error(self) -> Error {
        let status = self.status();
        if status == StatusCode::LOOP_DETECTED {
            return Error::Loop {
                upstream: self.upstream,
            };
        }
        let retry_after = self.header(header::RETRY_AFTER).map(str::to_string);
        let challenge = self.header(header::WWW_AUTHENTICATE).map(str::to_string);
        let upstream = self.upstream.clone();
        let body = self.bytes(MAX_ERROR_BODY, "error body").await.ok();
        Error::Status {
            upstream,
            status,
            body: body.as_deref().and_then(OciBody::parse),
            retry_after,
            challenge,
        }
    }

    /// The whole body, refusing more than `limit` bytes however it is sent
    /// (announced or chunked).
    pub async fn bytes(mut self, limit: usize, what: &str) -> Result<Bytes, Error> {
        let too_large = |upstream: &str| Error::TooLarge {
            upstream: upstream.to_string(),
            what: what.to_string(),
            limit: limit as u64,
        };
        if self.content_length().is_some_and(|l| l > limit as u64) {
            return Err(too_large(&self.upstream));
        }
        let mut out = bytes::BytesMut::new();
        loop {
            let next = tokio::time::timeout(self.idle_timeout, self.inner.chunk()).await;
            let chunk = match next {
                Err(_) => {
                    self.body_failed(&format!("{what} stalled"), true);
                    return Err(Error::Timeout {
                        upstream: self.upstream,
                        phase: Phase::Body,
                        after: self.idle_timeout,
                    });
                }
                Ok(Err(e)) => {
                    self.body_failed(&format!("{what} broke off: {}", error_chain(&e)), e.is_timeout());
                    return Err(Error::Protocol {
                        upstream: self.upstream,
                        message: format!("{what} broke off: {}", error_chain(&e)),
                    });
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            if out.len() + chunk.len() > limit {
                return Err(too_large(&self.upstream));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    /// The body as a stream of chunks; a transport failure mid-body is an
    /// `io::Error` naming the upstream, and counts against the URL's
    /// health (a stall puts it into back-off). The idle gap between chunks
    /// is bounded by the client's read timeout.
    pub fn into_stream(self) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        let (upstream, health) = (self.upstream, self.health);
        self.inner.bytes_stream().map_err(move |e| {
            let why = if e.is_timeout() {
                format!("body stalled: {}", error_chain(&e))
            } else {
                format!("body broke off: {}", error_chain(&e))
            };
            match &health {
                Some(h) if e.is_timeout() => h.failure(&why, None),
                Some(h) => h.note(&why),
                None => {}
            }
            std::io::Error::other(format!("upstream {upstream}: {why}"))
        })
    }
}
