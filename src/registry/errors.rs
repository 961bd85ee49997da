//! The one place where failures become HTTP responses.
//!
//! Every error a client sees is an OCI error body
//! (`{"errors":[{"code","message","detail"}]}`) with a status that says whose
//! fault it was: 4xx for the request, 502/503/504 for upstream, 500 for us.
//! Lower layers report what failed in their own terms (`upstream::Error`,
//! `cache::FetchError`, `route::RouteError`); the `From` conversions below
//! are the only code that turns those into statuses and codes.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::{full, Body};
use crate::cache::FetchError;
use crate::route::RouteError;
use crate::upstream::error::{Error as UpstreamError, OciBody, TokenError};

/// The error codes of the OCI distribution spec (and distribution's own
/// additions), plus whatever other code an upstream sent, passed on as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OciCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    ManifestBlobUnknown,
    SizeInvalid,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    TagInvalid,
    PaginationNumberInvalid,
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    NotFound,
    Unavailable,
    Unknown,
    /// A code upstream sent that is not one of the above.
    Other(String),
}

impl OciCode {
    pub fn as_str(&self) -> &str {
        match self {
            OciCode::BlobUnknown => "BLOB_UNKNOWN",
            OciCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            OciCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            OciCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            OciCode::SizeInvalid => "SIZE_INVALID",
            OciCode::DigestInvalid => "DIGEST_INVALID",
            OciCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            OciCode::ManifestInvalid => "MANIFEST_INVALID",
            OciCode::NameInvalid => "NAME_INVALID",
            OciCode::NameUnknown => "NAME_UNKNOWN",
            OciCode::TagInvalid => "TAG_INVALID",
            OciCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            OciCode::RangeInvalid => "RANGE_INVALID",
            OciCode::Unauthorized => "UNAUTHORIZED",
            OciCode::Denied => "DENIED",
            OciCode::Unsupported => "UNSUPPORTED",
            OciCode::TooManyRequests => "TOOMANYREQUESTS",
            OciCode::NotFound => "NOT_FOUND",
            OciCode::Unavailable => "UNAVAILABLE",
            OciCode::Unknown => "UNKNOWN",
            OciCode::Other(s) => s,
        }
    }

    fn parse(s: &str) -> OciCode {
        [
            OciCode::BlobUnknown,
            OciCode::BlobUploadInvalid,
            OciCode::BlobUploadUnknown,
            OciCode::ManifestBlobUnknown,
            OciCode::SizeInvalid,
            OciCode::DigestInvalid,
            OciCode::ManifestUnknown,
            OciCode::ManifestInvalid,
            OciCode::NameInvalid,
            OciCode::NameUnknown,
            OciCode::TagInvalid,
            OciCode::PaginationNumberInvalid,
            OciCode::RangeInvalid,
            OciCode::Unauthorized,
            OciCode::Denied,
            OciCode::Unsupported,
            OciCode::TooManyRequests,
            OciCode::NotFound,
            OciCode::Unavailable,
            OciCode::Unknown,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
        .unwrap_or_else(|| OciCode::Other(s.to_string()))
    }
}

#[derive(Clone, Debug)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: OciCode,
    pub message: String,
    pub detail: Option<Box<serde_json::Value>>,
    /// The `WWW-Authenticate` of a 401: how the client gets a usable token.
    pub challenge: Option<HeaderValue>,
    /// Headers the answer needs besides: `Retry-After` passed through from
    /// an upstream 429/503, an upload's `Range` and `Location` on a 416 (so
    /// the client can resume).
    pub extra_headers: Box<[(header::HeaderName, HeaderValue)]>,
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code.as_str(), self.message)
    }
}

impl RegistryError {
    pub fn new(status: StatusCode, code: OciCode, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            detail: None,
            challenge: None,
            extra_headers: Box::default(),
        }
    }

    /// No usable credential for what was asked; the seam adds the challenge.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, OciCode::Unauthorized, message)
    }

    /// Upstream could not be asked something only it can answer.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, OciCode::Unavailable, message)
    }

    /// The repository is not on this proxy's allow-list.
    pub fn not_allowed(repo: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            OciCode::Denied,
            format!("{repo} may not be pulled through this proxy"),
        )
    }

    /// Adds a header to the error's answer.
    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        let mut all = std::mem::take(&mut self.extra_headers).into_vec();
        all.push((name, value));
        self.extra_headers = all.into_boxed_slice();
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(Box::new(detail));
        self
    }

    /// Upstream's "not found", said the way the spec says it for what was
    /// asked (a manifest, a blob, a repository), in the client's words
    /// only (upstream's detail may name upstream's repository); other
    /// errors unchanged.
    pub fn when_not_found(mut self, code: OciCode, message: impl Into<String>) -> Self {
        if self.status == StatusCode::NOT_FOUND {
            self.code = code;
            self.message = message.into();
            self.detail = None;
        }
        self
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, OciCode::Unsupported, message)
    }

    pub fn header_too_large(bytes: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            OciCode::Unsupported,
            format!("request line and headers are {bytes} bytes; the limit is {limit}"),
        )
    }

    pub fn unknown_host(host: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            OciCode::NameUnknown,
            format!("no upstream is configured for host {host:?}"),
        )
    }

    pub fn misdirected(sni: &str, host: &str) -> Self {
        Self::new(
            StatusCode::MISDIRECTED_REQUEST,
            OciCode::Denied,
            format!("the connection was made for {sni:?}, not for Host {host:?}"),
        )
    }

    pub fn range_not_satisfiable(size: u64) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            OciCode::RangeInvalid,
            format!("requested range not satisfiable (size {size})"),
        )
        .with_detail(serde_json::json!({ "size": size }))
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, OciCode::Unknown, message)
    }

    pub fn loop_detected() -> Self {
        Self::new(
            StatusCode::LOOP_DETECTED,
            OciCode::Unsupported,
            "request looped back to regmirror: an upstream hostname resolves to this proxy",
        )
    }

    fn gateway(status: StatusCode, message: String) -> Self {
        Self::new(status, OciCode::Unavailable, message)
    }

    /// An upstream answer that was not a success, keeping upstream's own
    /// code and message when it sent an OCI error body.
    fn from_upstream_status(
        upstream: &str,
        status: StatusCode,
        body: Option<&OciBody>,
        retry_after: Option<&str>,
    ) -> Self {
        let default_code = match status {
            StatusCode::NOT_FOUND => OciCode::NameUnknown,
            StatusCode::UNAUTHORIZED => OciCode::Unauthorized,
            StatusCode::FORBIDDEN => OciCode::Denied,
            StatusCode::TOO_MANY_REQUESTS => OciCode::TooManyRequests,
            _ if status.is_server_error() => OciCode::Unavailable,
            _ => OciCode::Unknown,
        };
        // No body (a HEAD, or a terse upstream): say it in the words
        // registries use, so clients print a familiar error.
        let words = || {
            let what = match status {
                StatusCode::UNAUTHORIZED => "authentication required",
                StatusCode::FORBIDDEN => "requested access to the resource is denied",
                StatusCode::NOT_FOUND => "not found",
                StatusCode::TOO_MANY_REQUESTS => "too many requests",
                _ => "request failed",
            };
            format!("{what} (upstream {upstream} answered {status})")
        };
        let code = body
            .and_then(|b| b.code.as_deref())
            .map(OciCode::parse)
            .unwrap_or(default_code);
        let message = body.and_then(|b| b.message.clone()).unwrap_or_else(words);
        // A 5xx from upstream is a gateway problem for our client.
        let status = if status.is_server_error() {
            StatusCode::BAD_GATEWAY
        } else {
            status
        };
        RegistryError {
            status,
            code,
            message,
            detail: body.and_then(|b| b.detail.clone().map(Box::new)),
            challenge: None,
            extra_headers: retry_after
                .and_then(|r| HeaderValue::from_str(r).ok())
                .map(|v| (header::RETRY_AFTER, v))
                .into_iter()
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let entry = serde_json::json!({
            "code": self.code.as_str(),
            "message": self.message,
            "detail": self.detail.map_or(serde_json::Value::Null, |d| *d),
        });
        let body = serde_json::json!({ "errors": [entry] }).to_string();
        let mut resp = Response::new(full(Bytes::from(body)));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(c) = self.challenge {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        for (k, v) in self.extra_headers.into_vec() {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<UpstreamError> for RegistryError {
    fn from(e: UpstreamError) -> Self {
        let message = e.to_string();
        match e {
            UpstreamError::Connect { .. }
            | UpstreamError::Reset { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::TooLarge { .. } => RegistryError::gateway(StatusCode::BAD_GATEWAY, message),
            UpstreamError::Timeout { .. } => RegistryError::gateway(StatusCode::GATEWAY_TIMEOUT, message),
            UpstreamError::Status {
                upstream,
                status,
                body,
                retry_after,
                ..
            } => RegistryError::from_upstream_status(&upstream, status, body.as_ref(), retry_after.as_deref()),
            UpstreamError::Token { upstream, source } => match source {
                TokenError::Refused {
                    status: StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN,
                    body,
                    scope,
                    ..
                } => {
                    let why = body.and_then(|b| b.message).unwrap_or_else(|| "refused".into());
                    RegistryError::new(
                        StatusCode::FORBIDDEN,
                        OciCode::Denied,
                        format!("upstream {upstream} refused a token for {scope}: {why}"),
                    )
                }
                TokenError::Refused { status, body, .. } => {
                    RegistryError::from_upstream_status(&upstream, status, body.as_ref(), None)
                }
                _ => RegistryError::gateway(StatusCode::BAD_GATEWAY, message),
            },
            UpstreamError::Loop { .. } => RegistryError::loop_detected(),
            UpstreamError::Unavailable { retry_after, .. } => {
                let mut e = RegistryError::unavailable(message);
                e = e.with_header(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
                e
            }
        }
    }
}

impl From<FetchError> for RegistryError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Source(s) => match s.downcast_ref::<UpstreamError>() {
                Some(u) => u.clone().into(),
                None => RegistryError::gateway(StatusCode::BAD_GATEWAY, s.to_string()),
            },
            FetchError::Store { digest, op, source } => {
                RegistryError::internal(format!("cache store failure ({op}) for {digest}: {source}"))
            }
            FetchError::Abandoned { .. } => RegistryError::internal(e.to_string()),
            FetchError::Broken { .. }
            | FetchError::Short { .. }
            | FetchError::Long { .. }
            | FetchError::DigestMismatch { .. } => RegistryError::gateway(StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }
}

impl From<RouteError> for RegistryError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound(m) => RegistryError::new(StatusCode::NOT_FOUND, OciCode::NotFound, m),
            RouteError::NameInvalid(m) => RegistryError::new(StatusCode::BAD_REQUEST, OciCode::NameInvalid, m),
            RouteError::DigestInvalid(m) => RegistryError::new(StatusCode::BAD_REQUEST, OciCode::DigestInvalid, m),
            RouteError::TagInvalid(m) => RegistryError::new(StatusCode::BAD_REQUEST, OciCode::TagInvalid, m),
            RouteError::PaginationInvalid(m) => {
                RegistryError::new(StatusCode::BAD_REQUEST, OciCode::PaginationNumberInvalid, m)
            }
            RouteError::UnknownNamespace(m) => RegistryError::new(StatusCode::NOT_FOUND, OciCode::NameUnknown, m),
            RouteError::UploadUnknown(m) => RegistryError::new(StatusCode::NOT_FOUND, OciCode::BlobUploadUnknown, m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn upstream_status(status: u16, body: &[u8]) -> UpstreamError {
        UpstreamError::Status {
            upstream: "q".into(),
            status: StatusCode::from_u16(status).unwrap(),
            body: OciBody::parse(body),
            retry_after: Some("7".into()),
            challenge: None,
        }
    }

    #[tokio::test]
    async fn error_bodies_are_oci_json() {
        let resp = RegistryError::from(upstream_status(404, b""))
            .when_not_found(OciCode::ManifestUnknown, "manifest unknown: 1.0")
            .into_response();
        assert_eq!(resp.status(), 404);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    }

    #[test]
    fn upstream_errors_keep_their_code_and_become_gateway_errors() {
        let e = RegistryError::from(upstream_status(
            403,
            br#"{"errors":[{"code":"DENIED","message":"nope"}]}"#,
        ));
        assert_eq!(
            (e.status.as_u16(), e.code.as_str(), e.message.as_str()),
            (403, "DENIED", "nope")
        );
        let e = RegistryError::from(upstream_status(503, b"<html>"));
        assert_eq!((e.status.as_u16(), e.code.as_str()), (502, "UNAVAILABLE"));
        let e = RegistryError::from(upstream_status(429, b""));
        assert!(
            e.extra_headers
                .iter()
                .any(|(k, v)| k == header::RETRY_AFTER && v == "7"),
            "Retry-After reaches the client"
        );
        let e = RegistryError::from(upstream_status(400, br#"{"errors":[{"code":"WEIRD_THING"}]}"#));
        assert_eq!(e.code.as_str(), "WEIRD_THING", "codes we do not know pass through");
        let e = RegistryError::from(UpstreamError::Loop { upstream: "q".into() });
        assert_eq!(e.status.as_u16(), 508);
    }

    #[test]
    fn bad_content_is_upstreams_fault_and_store_failures_are_ours() {
        let d = crate::reference::Digest::of(b"x");
        let e = RegistryError::from(FetchError::DigestMismatch {
            expected: d.clone(),
            got: crate::reference::Digest::of(b"y"),
        });
        assert_eq!(e.status.as_u16(), 502);
        let e = RegistryError::from(FetchError::store(&d, "write", std::io::Error::other("disk")));
        assert_eq!(e.status.as_u16(), 500);
    }
}
