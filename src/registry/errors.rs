//! The one place where failures become HTTP responses.
//!
//! Every error a client sees is an OCI error body
//! (`{"errors":[{"code","message","detail"}]}`) with a status that says whose
//! fault it was: 4xx for the request, 502/503/504 for upstream, 500 for us.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::{full, Body};
use crate::route::RouteError;

#[derive(Clone, Debug)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    /// Passed through from an upstream 429/503.
    pub retry_after: Option<HeaderValue>,
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl RegistryError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code: code.to_string(),
            message: message.into(),
            detail: None,
            retry_after: None,
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", message)
    }

    pub fn manifest_unknown(reference: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            format!("manifest unknown: {reference}"),
        )
    }

    pub fn blob_unknown(digest: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", format!("blob unknown: {digest}"))
    }

    pub fn range_not_satisfiable(size: u64) -> Self {
        let mut e = Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            format!("requested range not satisfiable (size {size})"),
        );
        e.detail = Some(serde_json::json!({ "size": size }));
        e
    }

    /// Upstream could not be reached or broke the protocol: a gateway error.
    pub fn upstream_unavailable(upstream: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UNAVAILABLE",
            format!("upstream {upstream} unavailable: {why}"),
        )
    }

    pub fn upstream_timeout(upstream: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "UNAVAILABLE",
            format!("upstream {upstream} timed out: {why}"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }

    pub fn loop_detected() -> Self {
        Self::new(
            StatusCode::LOOP_DETECTED,
            "UNSUPPORTED",
            "request looped back to regmirror: an upstream hostname resolves to this proxy",
        )
    }

    /// An upstream error response, keeping upstream's own code and message
    /// when it sent an OCI error body.
    pub fn from_upstream(upstream: &str, status: StatusCode, body: &[u8], retry_after: Option<HeaderValue>) -> Self {
        #[derive(serde::Deserialize)]
        struct Errors {
            errors: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            code: Option<String>,
            message: Option<String>,
            detail: Option<serde_json::Value>,
        }
        let parsed = serde_json::from_slice::<Errors>(body)
            .ok()
            .and_then(|e| e.errors.into_iter().next());
        let default_code = match status {
            StatusCode::NOT_FOUND => "NAME_UNKNOWN",
            StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
            StatusCode::FORBIDDEN => "DENIED",
            StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
            _ if status.is_server_error() => "UNAVAILABLE",
            _ => "UNKNOWN",
        };
        let (code, message, detail) = match parsed {
            Some(e) => (
                e.code.unwrap_or_else(|| default_code.to_string()),
                e.message.unwrap_or_else(|| status.to_string()),
                e.detail,
            ),
            // No body (a HEAD, or a terse upstream): say it in the words
            // registries use, so clients print a familiar error.
            None => {
                let what = match status {
                    StatusCode::UNAUTHORIZED => "authentication required",
                    StatusCode::FORBIDDEN => "requested access to the resource is denied",
                    StatusCode::NOT_FOUND => "not found",
                    StatusCode::TOO_MANY_REQUESTS => "too many requests",
                    _ => "request failed",
                };
                (
                    default_code.to_string(),
                    format!("{what} (upstream {upstream} answered {status})"),
                    None,
                )
            }
        };
        // A 5xx from upstream is a gateway problem for our client, except a
        // 508: that is our own loop detection answering through the loop,
        // and the client should see it as such.
        let status = if status.is_server_error() && status != StatusCode::LOOP_DETECTED {
            StatusCode::BAD_GATEWAY
        } else {
            status
        };
        RegistryError {
            status,
            code,
            message,
            detail,
            retry_after,
        }
    }

    pub fn is_upstream_failure(&self) -> bool {
        self.status.is_server_error() || self.status == StatusCode::TOO_MANY_REQUESTS
    }

    pub fn into_response(self) -> Response<Body> {
        let entry = serde_json::json!({
            "code": self.code,
            "message": self.message,
            "detail": self.detail.unwrap_or(serde_json::Value::Null),
        });
        let body = serde_json::json!({ "errors": [entry] }).to_string();
        let mut resp = Response::new(full(Bytes::from(body)));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(r) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, r);
        }
        resp
    }
}

impl From<RouteError> for RegistryError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound(m) => RegistryError::new(StatusCode::NOT_FOUND, "NOT_FOUND", m),
            RouteError::NameInvalid(m) => RegistryError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", m),
            RouteError::DigestInvalid(m) => RegistryError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", m),
            RouteError::TagInvalid(m) => RegistryError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", m),
            RouteError::UnknownNamespace(m) => RegistryError::new(StatusCode::NOT_FOUND, "NAME_UNKNOWN", m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_bodies_are_oci_json() {
        let resp = RegistryError::manifest_unknown("1.0").into_response();
        assert_eq!(resp.status(), 404);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "MANIFEST_UNKNOWN");
    }

    #[test]
    fn upstream_errors_keep_their_code_and_become_gateway_errors() {
        let e = RegistryError::from_upstream(
            "q",
            StatusCode::FORBIDDEN,
            br#"{"errors":[{"code":"DENIED","message":"nope"}]}"#,
            None,
        );
        assert_eq!(
            (e.status.as_u16(), e.code.as_str(), e.message.as_str()),
            (403, "DENIED", "nope")
        );
        let e = RegistryError::from_upstream("q", StatusCode::SERVICE_UNAVAILABLE, b"<html>", None);
        assert_eq!((e.status.as_u16(), e.code.as_str()), (502, "UNAVAILABLE"));
        assert!(e.is_upstream_failure());
    }
}
