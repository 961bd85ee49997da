//! What is recorded of each request once it is answered: one log line, the
//! request metrics, and (for manifests) an entry in the recent pulls the
//! status page shows.
//!
//! `handle` fills a [`RequestInfo`] while routing; a handler that served
//! content says how the cache found it by putting a [`RequestOutcome`] in
//! its response's extensions. Nothing here parses a response to find out.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use http::{header, Method, Response};
use http_body_util::BodyExt;

use super::body::Body;
use crate::cache::Lookup;
use crate::metrics::{KindLabel, ServedLabels, UpstreamLabel, METRICS};
use prometheus_client::metrics::histogram::Histogram;

/// How the cache answered a request, set by the handler on its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Hit,
    Miss,
    Join,
    /// A tag answered from cache because upstream failed.
    Stale,
}

impl RequestOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Hit => "hit",
            RequestOutcome::Miss => "miss",
            RequestOutcome::Join => "join",
            RequestOutcome::Stale => "stale",
        }
    }

    /// Puts the outcome on a response, for [`finish`] to read.
    pub fn mark(self, resp: &mut Response<Body>) {
        resp.extensions_mut().insert(self);
    }
}

impl From<Lookup> for RequestOutcome {
    fn from(l: Lookup) -> Self {
        match l {
            Lookup::Hit => RequestOutcome::Hit,
            Lookup::Miss => RequestOutcome::Miss,
            Lookup::Join => RequestOutcome::Join,
        }
    }
}

/// The upstream a request turned out to be for when routing alone could
/// not tell (a token request names it in its scopes): set by the handler
/// on its response, for the log line and the request metrics.
#[derive(Debug, Clone)]
pub struct AnsweredFor(pub String);

/// What routing learned of a request: filled by `dispatch` as far as it
/// gets (a request refused early has no upstream or repository).
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// The upstream's configured name.
    pub upstream: Option<String>,
    /// The repository as upstream knows it.
    pub repo: Option<String>,
    /// `ping`, `tag`, `manifest`, `blob`, `token`, `list` or `other`.
    pub kind: &'static str,
    /// The tag or digest of a manifest or blob request.
    pub reference: Option<String>,
    /// The listener the request came through ([`super::Listener::as_str`]).
    pub listener: &'static str,
}

impl Default for RequestInfo {
    fn default() -> Self {
        RequestInfo {
            upstream: None,
            repo: None,
            kind: "other",
            reference: None,
            listener: "plain",
        }
    }
}

/// Records a finished request: counts it, logs one line, remembers a
/// manifest pull, and wraps a content body so the bytes sent are counted
/// (by upstream, and by whether they came from the cache).
///
/// The logged `bytes` is the response's declared `Content-Length`: a
/// streamed body is still being sent when the line is written.
pub fn finish(
    info: &RequestInfo,
    method: &Method,
    path: &str,
    host: Option<&str>,
    started: Instant,
    mut resp: Response<Body>,
) -> Response<Body> {
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    let outcome = resp.extensions().get::<RequestOutcome>().copied();
    let answered_for = resp.extensions_mut().remove::<AnsweredFor>();
    let upstream = info
        .upstream
        .as_deref()
        .or(answered_for.as_ref().map(|a| a.0.as_str()))
        .unwrap_or("-");
    let bytes: Option<u64> = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    METRICS.request(upstream, info.kind, status);
    emit_events(info, method, &resp, outcome);
    METRICS
        .listener_requests
        .get_or_create(&crate::metrics::ListenerLabel {
            listener: info.listener,
        })
        .inc();
    let mut timer = matches!(info.kind, "tag" | "manifest" | "blob").then(|| Timer {
        started,
        histogram: METRICS
            .request_duration
            .get_or_create(&KindLabel { kind: info.kind })
            .clone(),
    });
    if let (Some(o), Some(up)) = (outcome, info.upstream.as_deref()) {
        let label = UpstreamLabel::of(up);
        match o {
            RequestOutcome::Hit => METRICS.cache_hits.get_or_create(&label).inc(),
            RequestOutcome::Miss => METRICS.cache_misses.get_or_create(&label).inc(),
            RequestOutcome::Join => METRICS.cache_joins.get_or_create(&label).inc(),
            RequestOutcome::Stale => METRICS.stale_served.get_or_create(&label).inc(),
        };
        if *method != Method::HEAD {
            let source = match o {
                RequestOutcome::Hit | RequestOutcome::Stale => "cache",
                RequestOutcome::Miss | RequestOutcome::Join => "upstream",
            };
            let labels = ServedLabels {
                upstream: up.to_string(),
                source,
            };
            // A body already in memory (a manifest) is counted now and its
            // time ends here: wrapping it to count its one frame cost an
            // allocation and an indirection per warm manifest request.
            if let Some(n) = hyper::body::Body::size_hint(resp.body()).exact() {
                METRICS.served_bytes.get_or_create(&labels).inc_by(n);
                return log_and_remember(
                    info, method, path, host, elapsed, upstream, status, bytes, outcome, resp,
                );
            }
            let counter = METRICS.served_bytes.get_or_create(&labels).clone();
            let body = std::mem::replace(resp.body_mut(), super::body::empty());
            // The request's time ends with its body (sent, or the client gone).
            let timer = timer.take();
            *resp.body_mut() = body
                .map_frame(move |f| {
                    let _timed = &timer;
                    if let Some(d) = f.data_ref() {
                        counter.inc_by(d.len() as u64);
                    }
                    f
                })
                .boxed_unsync();
        }
    }
    drop(timer);
    log_and_remember(
        info, method, path, host, elapsed, upstream, status, bytes, outcome, resp,
    )
}

/// The webhook events of a request: `pull` for a manifest GET answered
/// with content (by tag or digest), `miss` for a manifest or blob whose
/// download this request started. Read from what `finish` already has (the
/// response's headers name the digest, type and size), so the handlers
/// need not know about events.
fn emit_events(info: &RequestInfo, method: &Method, resp: &Response<Body>, outcome: Option<RequestOutcome>) {
    use crate::events::{self, Event, Kind};
    let content = matches!(info.kind, "tag" | "manifest" | "blob");
    let pull = matches!(info.kind, "tag" | "manifest") && *method == Method::GET && resp.status().is_success();
    let miss = content && outcome == Some(RequestOutcome::Miss);
    if !(pull && events::wanted(Kind::Pull) || miss && events::wanted(Kind::Miss)) {
        return;
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut event = Event::new(Kind::Pull);
    event.repository = info.repo.clone();
    event.reference = info.reference.clone();
    event.upstream = info.upstream.clone();
    event.digest = header("docker-content-digest").or_else(|| {
        // A blob (and a manifest by digest) is named by its digest.
        info.reference.clone().filter(|r| r.contains(':'))
    });
    event.media_type = header(header::CONTENT_TYPE.as_str()).filter(|_| info.kind != "blob");
    event.size = header(header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok());
    if miss {
        let mut m = event.clone();
        m.kind = Kind::Miss;
        events::emit(m);
    }
    if pull {
        events::emit(event);
    }
}

/// The request's log line, and the pull for the status page.
#[allow(clippy::too_many_arguments)]
fn log_and_remember(
    info: &RequestInfo,
    method: &Method,
    path: &str,
    host: Option<&str>,
    elapsed: std::time::Duration,
    upstream: &str,
    status: u16,
    bytes: Option<u64>,
    outcome: Option<RequestOutcome>,
    resp: Response<Body>,
) -> Response<Body> {
    let outcome_text = outcome.map_or("-", RequestOutcome::as_str);
    {
        use crate::logging::Value::{self, Num, Str, Word};
        fn or_dash(v: Option<&str>) -> Value<'_> {
            v.map_or(Word("-"), Str)
        }
        crate::logging::request_line(&[
            ("method", Word(method.as_str())),
            ("upstream", or_dash(Some(upstream).filter(|u| *u != "-"))),
            ("repo", or_dash(info.repo.as_deref())),
            ("kind", Word(info.kind)),
            ("reference", or_dash(info.reference.as_deref())),
            ("status", Num(status.into())),
            ("bytes", bytes.map_or(Value::None, Num)),
            ("outcome", Word(outcome_text)),
            ("duration_ms", Num(elapsed.as_millis() as u64)),
            ("path", Str(path)),
            ("host", or_dash(host)),
            ("listener", Word(info.listener)),
        ]);
    }
    if matches!(info.kind, "tag" | "manifest") && resp.status().is_success() && *method == Method::GET {
        if let (Some(upstream), Some(repo), Some(reference)) = (&info.upstream, &info.repo, &info.reference) {
            recent_push(RecentPull {
                at: SystemTime::now(),
                upstream: upstream.clone(),
                repo: repo.clone(),
                reference: reference.clone(),
                outcome: outcome_text,
            });
        }
    }
    resp
}

/// Observes a request's duration when dropped: at once for an answer
/// without a streamed body, else with the body.
struct Timer {
    started: Instant,
    histogram: Histogram,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// One manifest pull, as the status page lists it.
#[derive(Debug, Clone)]
pub struct RecentPull {
    pub at: SystemTime,
    pub upstream: String,
    pub repo: String,
    pub reference: String,
    pub outcome: &'static str,
}

/// How many manifest pulls the status page remembers.
pub const RECENT_PULLS: usize = 50;

static RECENT: LazyLock<Mutex<VecDeque<RecentPull>>> =
    LazyLock::new(|| Mutex::new(VecDeque::with_capacity(RECENT_PULLS)));

fn recent_push(p: RecentPull) {
    let mut q = RECENT.lock().unwrap_or_else(PoisonError::into_inner);
    if q.len() == RECENT_PULLS {
        q.pop_front();
    }
    q.push_back(p);
}

/// The last manifest pulls since start, newest first.
pub fn recent_pulls() -> Vec<RecentPull> {
    let q = RECENT.lock().unwrap_or_else(PoisonError::into_inner);
    q.iter().rev().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_pulls_keep_the_newest_few() {
        for i in 0..RECENT_PULLS + 5 {
            recent_push(RecentPull {
                at: SystemTime::now(),
                upstream: "u".into(),
                repo: format!("r{i}"),
                reference: "1".into(),
                outcome: "hit",
            });
        }
        let got = recent_pulls();
        assert_eq!(got.len(), RECENT_PULLS);
        assert_eq!(got[0].repo, format!("r{}", RECENT_PULLS + 4));
        assert_eq!(got[RECENT_PULLS - 1].repo, "r5");
    }
}
