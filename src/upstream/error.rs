//! What can go wrong when regmirror asks an upstream registry, in upstream's
//! terms. No HTTP status is chosen here for our own clients: that mapping
//! lives in `registry::errors`, which is the only place that knows how a
//! failure upstream looks to a client downstream.

use std::time::Duration;

use http::StatusCode;

/// The phase of an upstream exchange that ran out of time (rule 16: every
/// phase has its own deadline, never one total that caps a large layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Headers,
    Body,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connecting",
            Phase::Headers => "waiting for response headers",
            Phase::Body => "between body chunks",
        })
    }
}

/// The first entry of an OCI error body upstream sent, kept so clients see
/// upstream's own code and words.
#[derive(Debug, Clone, PartialEq)]
pub struct OciBody {
    pub code: Option<String>,
    pub message: Option<String>,
    pub detail: Option<serde_json::Value>,
}

impl OciBody {
    /// Parses `{"errors":[{...}]}`; anything else (HTML, empty) is `None`.
    pub fn parse(body: &[u8]) -> Option<OciBody> {
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
        let e = serde_json::from_slice::<Errors>(body).ok()?.errors.into_iter().next()?;
        Some(OciBody {
            code: e.code,
            message: e.message,
            detail: e.detail,
        })
    }
}

/// Why a token could not be had from upstream's realm.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("token realm {realm:?} is not a usable http(s) URL")]
    BadRealm { realm: String },
    #[error("token request to {realm}: {message}")]
    Transport { realm: String, message: String },
    #[error("the realm refused a token for {scope} ({status})")]
    Refused {
        scope: String,
        status: StatusCode,
        body: Option<OciBody>,
    },
    #[error("token response from {realm}: {message}")]
    Malformed { realm: String, message: String },
}

/// A failed upstream exchange. Cloneable so a single-flight download can
/// hand the same failure to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("upstream {upstream} unreachable: {message}")]
    Connect { upstream: String, message: String },
    /// The connection broke before upstream answered (a pooled connection
    /// the other end had closed, a reset): says little about the URL's
    /// health, and an idempotent request is simply sent again.
    #[error("upstream {upstream}: the connection broke before an answer: {message}")]
    Reset { upstream: String, message: String },
    #[error("upstream {upstream} timed out {phase} (after {after:?})")]
    Timeout {
        upstream: String,
        phase: Phase,
        after: Duration,
    },
    /// Upstream answered, with something other than success.
    #[error("upstream {upstream} answered {status}{}", .body.as_ref().and_then(|b| b.message.as_deref()).map(|m| format!(": {m}")).unwrap_or_default())]
    Status {
        upstream: String,
        status: StatusCode,
        body: Option<OciBody>,
        retry_after: Option<String>,
        /// Upstream's `WWW-Authenticate`, for a 401.
        challenge: Option<String>,
    },
    #[error("upstream {upstream}: {source}")]
    Token { upstream: String, source: TokenError },
    #[error("upstream {upstream}: {what} is larger than {limit} bytes")]
    TooLarge { upstream: String, what: String, limit: u64 },
    /// Upstream's answer broke the protocol (a body that broke off, a
    /// required header missing).
    #[error("upstream {upstream}: {message}")]
    Protocol { upstream: String, message: String },
    /// Every URL of the upstream is known down (backing off after
    /// failures): nothing was sent, so the client hears it at once and can
    /// fall back to another mirror instead of waiting out a timeout.
    #[error("upstream {upstream} is unavailable: every URL failed recently (next try in {retry_after:?}); last failure: {last_error}")]
    Unavailable {
        upstream: String,
        retry_after: Duration,
        /// The most recent failure among the URLs, so the answer says why.
        last_error: String,
    },
    /// Our own request came back to us: an upstream name resolves to this
    /// proxy (rule 15). Never transient, never a reason to serve stale.
    #[error("request to upstream {upstream} looped back to regmirror")]
    Loop { upstream: String },
}

impl Error {
    /// True when the failure says nothing about the content and may pass:
    /// upstream down, slow, overloaded or rate-limiting. Only these make a
    /// cached tag worth serving stale (rule 2).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Reset { .. }
            | Error::Timeout { .. }
            | Error::Protocol { .. }
            | Error::Unavailable { .. } => true,
            Error::Status { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || status.is_server_error()
            }
            Error::Token { source, .. } => match source {
                TokenError::Transport { .. } | TokenError::Malformed { .. } => true,
                TokenError::Refused { status, .. } => {
                    *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
                }
                TokenError::BadRealm { .. } => false,
            },
            Error::TooLarge { .. } | Error::Loop { .. } => false,
        }
    }

    /// The upstream status, when upstream answered at all.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// reqwest's Display hides the cause ("error sending request"); the chain
/// says what actually failed (DNS, refused, certificate).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16) -> Error {
        Error::Status {
            upstream: "u".into(),
            status: StatusCode::from_u16(s).unwrap(),
            body: None,
            retry_after: None,
            challenge: None,
        }
    }

    #[test]
    fn only_failures_of_upstream_itself_are_transient() {
        assert!(status(500).is_transient());
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(404).is_transient());
        assert!(!status(401).is_transient());
        assert!(
            !Error::Loop { upstream: "u".into() }.is_transient(),
            "our own loop answer is never served around as 'upstream down'"
        );
        assert!(Error::Connect {
            upstream: "u".into(),
            message: "refused".into()
        }
        .is_transient());
    }

    #[test]
    fn oci_bodies_are_parsed_and_anything_else_is_not() {
        let b = OciBody::parse(br#"{"errors":[{"code":"DENIED","message":"nope"}]}"#).unwrap();
        assert_eq!(
            (b.code.as_deref(), b.message.as_deref()),
            (Some("DENIED"), Some("nope"))
        );
        assert!(OciBody::parse(b"<html>").is_none());
        assert!(OciBody::parse(br#"{"errors":[]}"#).is_none());
    }
}
