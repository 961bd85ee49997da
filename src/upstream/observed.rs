//! What the last exchanges with each upstream said about it: when it last
//! answered well, its last failure and why, and the pull allowance it
//! announced. Recorded where responses and errors are seen, read by the
//! status page; the same observations feed the upstream metrics.
//!
//! Holds observations only: nothing here decides whether to ask upstream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::SystemTime;

use http::{HeaderMap, StatusCode};

use super::error::Error;
use crate::metrics::{UpstreamLabel, METRICS};

/// One upstream's health as last observed.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHealth {
    /// The last failure (no answer, 5xx or 429) and when it happened.
    pub last_error: Option<(String, SystemTime)>,
    /// When upstream last answered without failing.
    pub last_success: Option<SystemTime>,
    /// The leading number of the last `ratelimit-remaining` header
    /// (Docker Hub: `100;w=21600`, pulls left in the window).
    pub ratelimit_remaining: Option<u64>,
}

static HEALTH: LazyLock<Mutex<HashMap<String, UpstreamHealth>>> = LazyLock::new(Default::default);

fn update(upstream: &str, f: impl FnOnce(&mut UpstreamHealth)) {
    let mut map = HEALTH.lock().unwrap_or_else(PoisonError::into_inner);
    match map.get_mut(upstream) {
        Some(h) => f(h),
        None => f(map.entry(upstream.to_string()).or_default()),
    }
}

/// Records one registry exchange with `upstream`: its answer, or the
/// error that stood for one.
pub(crate) fn record(upstream: &str, result: &Result<reqwest::Response, Error>) {
    match result {
        Ok(resp) => answered(upstream, resp.status(), resp.headers()),
        Err(e) => failed(upstream, e),
    }
}

fn answered(upstream: &str, status: StatusCode, headers: &HeaderMap) {
    METRICS.upstream_answer(upstream, Some(status.as_u16()));
    let remaining = headers
        .get("ratelimit-remaining")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_ratelimit);
    if let Some(n) = remaining {
        METRICS
            .upstream_ratelimit_remaining
            .get_or_create(&UpstreamLabel::of(upstream))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        METRICS
            .upstream_rate_limited
            .get_or_create(&UpstreamLabel::of(upstream))
            .inc();
    }
    let failure = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
    update(upstream, |h| {
        if remaining.is_some() {
            h.ratelimit_remaining = remaining;
        }
        if failure {
            h.last_error = Some((format!("answered {status}"), SystemTime::now()));
        } else {
            h.last_success = Some(SystemTime::now());
        }
    });
}

fn failed(upstream: &str, e: &Error) {
    METRICS.upstream_answer(upstream, None);
    update(upstream, |h| h.last_error = Some((e.to_string(), SystemTime::now())));
}

/// The leading count of a `ratelimit-remaining` value (`100;w=21600`).
fn parse_ratelimit(v: &str) -> Option<u64> {
    v.split(';').next()?.trim().parse().ok()
}

/// Every upstream observed so far, by name.
pub fn snapshot() -> BTreeMap<String, UpstreamHealth> {
    let map = HEALTH.lock().unwrap_or_else(PoisonError::into_inner);
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_values_as_docker_hub_sends_them() {
        assert_eq!(parse_ratelimit("100;w=21600"), Some(100));
        assert_eq!(parse_ratelimit(" 7 "), Some(7));
        assert_eq!(parse_ratelimit("0;w=60"), Some(0));
        assert_eq!(parse_ratelimit("many;w=1"), None);
        assert_eq!(parse_ratelimit(""), None);
        assert_eq!(parse_ratelimit("-1"), None);
    }

    #[test]
    fn answers_and_failures_are_remembered_per_upstream() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", "42;w=21600".parse().unwrap());
        answered("health-test-a", StatusCode::OK, &h);
        answered("health-test-a", StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new());
        let snap = snapshot();
        let a = &snap["health-test-a"];
        assert_eq!(a.ratelimit_remaining, Some(42));
        assert!(a.last_success.is_some());
        assert!(a.last_error.as_ref().unwrap().0.contains("429"));
        failed(
            "health-test-b",
            &Error::Connect {
                upstream: "health-test-b".into(),
                message: "connection refused".into(),
            },
        );
        let b = &snapshot()["health-test-b"];
        assert!(b.last_error.as_ref().unwrap().0.contains("connection refused"));
        assert!(b.last_success.is_none());
    }
}
