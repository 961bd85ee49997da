//! Process-wide metrics, exported on `/metrics` in the Prometheus text
//! format by the `prometheus-client` crate.
//!
//! One registry for the process, built on first use: any module records
//! with `METRICS.field…` (an atomic add, plus a label lookup for labelled
//! families) and never formats anything. Only [`Metrics::render`] writes
//! the exposition format.

use std::sync::LazyLock;

use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The content type of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Label of metrics kept per configured upstream (its `name`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

impl UpstreamLabel {
    pub fn of(upstream: &str) -> Self {
        UpstreamLabel {
            upstream: upstream.to_string(),
        }
    }
}

/// Labels of a client request: which upstream (`-` when none, e.g.
/// `/metrics`), what it asked for, and the class of our answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub upstream: String,
    pub kind: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Where bytes sent to a client came from: `cache` (a hit) or `upstream`
/// (a download followed as it grew, or streamed through).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    pub upstream: String,
    pub source: &'static str,
}

/// The listener a client request came through: `tls`, `plain` or `connect`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

/// Why an HTTP/2 connection was cut off (`rapid_reset`, `ping_flood`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct H2AbuseLabel {
    pub kind: &'static str,
}

/// What the CONNECT listener did with a CONNECT request: `intercepted`,
/// `passthrough` or `refused`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectLabel {
    pub outcome: &'static str,
}

/// A tag answered without asking upstream, and why: `interval`
/// (confirmed within `tag_check_interval`) or `immutable`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TagSkipLabels {
    pub upstream: String,
    pub reason: &'static str,
}

/// How a `[[warm]]` run ended: `ok`, or `failed` (an image could not be warmed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WarmRunLabel {
    pub result: &'static str,
}

/// An upstream answer: its status code, or `error` when none came.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamStatusLabels {
    pub upstream: String,
    pub status: String,
}

/// One URL of an upstream (`urls`), as configured.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UrlLabels {
    pub upstream: String,
    pub url: String,
}

/// A `[[webhook]]`, by its URL (without credentials or query).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub webhook: String,
}

/// What became of a cold digest another replica owns (`[cluster]`):
/// `owner` (streamed from it) or `fallback` (fetched here: the owner did
/// not answer, or refused).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerFetchLabels {
    pub result: &'static str,
}

/// One delivery attempt to a webhook and how it went: `ok` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookDeliveryLabels {
    pub webhook: String,
    pub result: &'static str,
}

type Histograms = Family<KindLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms … about 6 min: a hot manifest to a large layer sent slowly.
    Histogram::new(exponential_buckets(0.001, 2.5, 15))
}

pub struct Metrics {
    registry: Registry,
    /// Client requests by upstream, kind and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to answer manifest (`tag`, `manifest`) and `blob` requests,
    /// until the body was sent (or the client left).
    pub request_duration: Histograms,
    /// Content served from the store without asking upstream for it.
    pub cache_hits: Family<UpstreamLabel, Counter>,
    /// Requests that started a download of missing content.
    pub cache_misses: Family<UpstreamLabel, Counter>,
    /// Requests that joined a download another request had started.
    pub cache_joins: Family<UpstreamLabel, Counter>,
    /// Bytes sent to clients, by upstream and by where they came from.
    pub served_bytes: Family<ServedLabels, Counter>,
    /// Bytes read from upstream registries' content bodies.
    pub upstream_fetched_bytes: Family<UpstreamLabel, Counter>,
    /// Downloads of missing content running now.
    pub downloads_in_flight: Gauge,
    /// Client responses streaming from a download still in progress.
    pub download_waiters: Gauge,
    /// Downloads aborted because the bytes were short, broken or did not match their digest.
    pub verify_failures: Counter,
    /// Of those, downloads whose bytes hashed to another digest.
    pub digest_mismatches: Counter,
    /// Downloads that failed (source, content or store error): nothing was stored.
    pub downloads_aborted: Counter,
    /// Tags served from cache because upstream failed.
    pub stale_served: Family<UpstreamLabel, Counter>,
    /// Tags answered from the store by the upstream's tag policy, without asking upstream.
    pub tag_checks_skipped: Family<TagSkipLabels, Counter>,
    /// `[[warm]]` runs by how they ended.
    pub warm_runs: Family<WarmRunLabel, Counter>,
    /// Content deleted to keep the store under `cache.max_size` (or a full disk).
    pub evicted_blobs: Counter,
    pub evicted_bytes: Counter,
    /// Bytes of content in the store, as the recency index counts them.
    pub cache_bytes: Gauge,
    /// Content deleted from the bucket to stay under `cache.bucket_max_size`.
    pub bucket_evicted_blobs: Counter,
    pub bucket_evicted_bytes: Counter,
    /// Bytes of content in the bucket, as the evictor last listed them.
    pub bucket_bytes: Gauge,
    /// Downloads served from upstream without being stored, for lack of disk space.
    pub disk_full: Counter,
    /// Connections closed at once because the client address is not in `[access] allow`.
    pub connections_refused: Counter,
    /// Client requests by the listener they came through (a CONNECT tunnel's
    /// requests count under `connect`).
    pub listener_requests: Family<ListenerLabel, Counter>,
    /// CONNECT requests by what was done with them.
    pub connect_requests: Family<ConnectLabel, Counter>,
    /// HTTP/2 connections closed for abuse, by kind.
    pub h2_abuse: Family<H2AbuseLabel, Counter>,
    /// Registry requests sent upstream, by the status that came back.
    pub upstream_requests: Family<UpstreamStatusLabels, Counter>,
    /// Upstream answers of 429 Too Many Requests.
    pub upstream_rate_limited: Family<UpstreamLabel, Counter>,
    /// The last `ratelimit-remaining` an upstream sent (Docker Hub's pull allowance).
    pub upstream_ratelimit_remaining: Family<UpstreamLabel, Gauge>,
    /// Token requests regmirror sent to upstream auth servers for its own requests.
    pub upstream_token_requests: Counter,
    /// Client token requests with credentials, relayed to upstream's realm.
    pub tokens_relayed: Family<UpstreamLabel, Counter>,
    /// Anonymous tokens regmirror issued itself.
    pub tokens_issued: Family<UpstreamLabel, Counter>,
    /// 1 while an upstream URL is in use, 0 while it is skipped (backing
    /// off after failures). Set from the URLs' health when scraped.
    pub upstream_url_up: Family<UrlLabels, Gauge>,
    /// Failures in a row of an upstream URL since it last answered.
    pub upstream_url_failures: Family<UrlLabels, Gauge>,
    /// When an upstream URL last answered (Unix seconds; 0: never).
    pub upstream_url_last_success: Family<UrlLabels, Gauge>,
    /// Upload sessions of local namespaces open now.
    pub uploads_open: Gauge,
    /// Blobs committed by pushes to local namespaces, and their bytes.
    pub pushed_blobs: Counter,
    pub pushed_bytes: Counter,
    /// Manifests pushed to local namespaces.
    pub pushed_manifests: Counter,
    /// Requests to local namespaces refused for want of a login or a right.
    pub local_refused: Counter,
    /// Webhook delivery attempts by result (each failed attempt counts).
    pub webhook_deliveries: Family<WebhookDeliveryLabels, Counter>,
    /// Events dropped from a full webhook queue (oldest first).
    pub webhook_dropped: Family<WebhookLabel, Counter>,
    /// Cold digests owned by another replica, by how they were fetched.
    pub peer_fetches: Family<PeerFetchLabels, Counter>,
    /// Requests claiming to come from a replica whose signature failed.
    pub peer_refused: Counter,
}

/// The one registry of the process.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            cache_joins: Family::default(),
            served_bytes: Family::default(),
            upstream_fetched_bytes: Family::default(),
            downloads_in_flight: Gauge::default(),
            download_waiters: Gauge::default(),
            verify_failures: Counter::default(),
            digest_mismatches: Counter::default(),
            downloads_aborted: Counter::default(),
            stale_served: Family::default(),
            tag_checks_skipped: Family::default(),
            warm_runs: Family::default(),
            evicted_blobs: Counter::default(),
            evicted_bytes: Counter::default(),
            cache_bytes: Gauge::default(),
            bucket_evicted_blobs: Counter::default(),
            bucket_evicted_bytes: Counter::default(),
            bucket_bytes: Gauge::default(),
            disk_full: Counter::default(),
            connections_refused: Counter::default(),
            listener_requests: Family::default(),
            connect_requests: Family::default(),
            h2_abuse: Family::default(),
            upstream_requests: Family::default(),
            upstream_rate_limited: Family::default(),
            upstream_ratelimit_remaining: Family::default(),
            upstream_token_requests: Counter::default(),
            tokens_relayed: Family::default(),
            tokens_issued: Family::default(),
            upstream_url_up: Family::default(),
            upstream_url_failures: Family::default(),
            upstream_url_last_success: Family::default(),
            uploads_open: Gauge::default(),
            pushed_blobs: Counter::default(),
            pushed_bytes: Counter::default(),
            pushed_manifests: Counter::default(),
            local_refused: Counter::default(),
            webhook_deliveries: Family::default(),
            webhook_dropped: Family::default(),
            peer_fetches: Family::default(),
            peer_refused: Counter::default(),
        };
        let mut r = Registry::with_prefix("regmirror");
        r.register(
            "requests",
            "client requests by upstream, kind and status class",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "time to answer manifest and blob requests, until the body was sent or the client left",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register("cache_hits", "content served from the store", m.cache_hits.clone());
        r.register(
            "cache_misses",
            "requests that started a download of missing content",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_joins",
            "requests that joined a running download",
            m.cache_joins.clone(),
        );
        r.register_with_unit(
            "served",
            "bytes sent to clients, by upstream and source (cache or upstream)",
            Unit::Bytes,
            m.served_bytes.clone(),
        );
        r.register_with_unit(
            "upstream_fetched",
            "bytes of content read from upstream",
            Unit::Bytes,
            m.upstream_fetched_bytes.clone(),
        );
        r.register(
            "uploads_open",
            "upload sessions of local namespaces open now",
            m.uploads_open.clone(),
        );
        r.register(
            "pushed_blobs",
            "blobs committed by pushes to local namespaces",
            m.pushed_blobs.clone(),
        );
        r.register_with_unit(
            "pushed",
            "bytes of blobs committed by pushes to local namespaces",
            Unit::Bytes,
            m.pushed_bytes.clone(),
        );
        r.register(
            "pushed_manifests",
            "manifests pushed to local namespaces",
            m.pushed_manifests.clone(),
        );
        r.register(
            "local_refused",
            "requests to local namespaces refused for want of a login or a right",
            m.local_refused.clone(),
        );
        r.register(
            "downloads_in_flight",
            "downloads of missing content running now",
            m.downloads_in_flight.clone(),
        );
        r.register(
            "download_waiters",
            "responses streaming from a download in progress",
            m.download_waiters.clone(),
        );
        r.register(
            "verify_failures",
            "downloads aborted as short, broken or corrupt",
            m.verify_failures.clone(),
        );
        r.register(
            "digest_mismatches",
            "downloads whose bytes did not match their digest",
            m.digest_mismatches.clone(),
        );
        r.register(
            "downloads_aborted",
            "downloads that ended without storing anything",
            m.downloads_aborted.clone(),
        );
        r.register(
            "stale_served",
            "tags served from cache because upstream failed",
            m.stale_served.clone(),
        );
        r.register(
            "tag_checks_skipped",
            "tags answered from the store without asking upstream (tag_check_interval, immutable_tags)",
            m.tag_checks_skipped.clone(),
        );
        r.register(
            "warm_runs",
            "scheduled ([[warm]]) warm runs, by result",
            m.warm_runs.clone(),
        );
        r.register(
            "evicted_blobs",
            "blobs deleted to stay under cache.max_size or free a full disk",
            m.evicted_blobs.clone(),
        );
        r.register_with_unit(
            "evicted",
            "bytes deleted to stay under cache.max_size or free a full disk",
            Unit::Bytes,
            m.evicted_bytes.clone(),
        );
        r.register_with_unit(
            "cache",
            "bytes of content in the store",
            Unit::Bytes,
            m.cache_bytes.clone(),
        );
        r.register(
            "bucket_evicted_blobs",
            "blobs deleted from the bucket to stay under cache.bucket_max_size",
            m.bucket_evicted_blobs.clone(),
        );
        r.register_with_unit(
            "bucket_evicted",
            "bytes deleted from the bucket to stay under cache.bucket_max_size",
            Unit::Bytes,
            m.bucket_evicted_bytes.clone(),
        );
        r.register_with_unit(
            "bucket",
            "bytes of content in the bucket, as the evictor last listed them",
            Unit::Bytes,
            m.bucket_bytes.clone(),
        );
        r.register(
            "disk_full",
            "downloads served without caching because the disk was full",
            m.disk_full.clone(),
        );
        r.register(
            "connections_refused",
            "connections from addresses outside [access] allow",
            m.connections_refused.clone(),
        );
        r.register(
            "listener_requests",
            "client requests by the listener they came through (tls, plain, connect)",
            m.listener_requests.clone(),
        );
        r.register(
            "h2_abuse",
            "HTTP/2 connections closed for abuse, by kind (rapid_reset, continuation_flood, header_list_too_large, ping_flood, settings_flood, zero_window, refused_streams)",
            m.h2_abuse.clone(),
        );
        r.register(
            "connect_requests",
            "CONNECT requests by outcome (intercepted, passthrough, refused)",
            m.connect_requests.clone(),
        );
        r.register(
            "upstream_requests",
            "registry requests sent upstream, by status code (error: no answer)",
            m.upstream_requests.clone(),
        );
        r.register(
            "upstream_rate_limited",
            "upstream answers of 429 Too Many Requests",
            m.upstream_rate_limited.clone(),
        );
        r.register(
            "upstream_ratelimit_remaining",
            "the last ratelimit-remaining an upstream sent",
            m.upstream_ratelimit_remaining.clone(),
        );
        r.register(
            "upstream_token_requests",
            "token requests sent to upstream auth servers for regmirror's own requests",
            m.upstream_token_requests.clone(),
        );
        r.register(
            "tokens_relayed",
            "client token requests with credentials relayed upstream",
            m.tokens_relayed.clone(),
        );
        r.register(
            "tokens_issued",
            "anonymous tokens issued by regmirror",
            m.tokens_issued.clone(),
        );
        r.register(
            "upstream_url_up",
            "1 while an upstream URL is in use, 0 while it is skipped after failures",
            m.upstream_url_up.clone(),
        );
        r.register(
            "upstream_url_consecutive_failures",
            "failures in a row of an upstream URL since it last answered",
            m.upstream_url_failures.clone(),
        );
        r.register_with_unit(
            "upstream_url_last_success_timestamp",
            "when an upstream URL last answered (Unix time; 0: never)",
            Unit::Seconds,
            m.upstream_url_last_success.clone(),
        );
        r.register(
            "webhook_deliveries",
            "webhook delivery attempts, by result (ok, failed: each failed attempt)",
            m.webhook_deliveries.clone(),
        );
        r.register(
            "webhook_dropped",
            "events dropped from a full webhook queue, oldest first",
            m.webhook_dropped.clone(),
        );
        r.register(
            "peer_fetches",
            "cold digests another replica owns, by result (owner: streamed from it, fallback: fetched here)",
            m.peer_fetches.clone(),
        );
        r.register(
            "peer_refused",
            "requests signed as a replica's whose signature did not verify",
            m.peer_refused.clone(),
        );
        m.registry = r;
        m
    }

    /// The whole registry in the Prometheus text format (see [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Sets the per-URL gauges from each upstream's URL health, so a
    /// scrape shows the state now (health changes without any metric call).
    pub fn set_url_states(&self, upstream: &str, states: &[crate::upstream::UrlState]) {
        for st in states {
            let l = UrlLabels {
                upstream: upstream.to_string(),
                url: st.url.clone(),
            };
            self.upstream_url_up.get_or_create(&l).set(i64::from(st.healthy));
            self.upstream_url_failures
                .get_or_create(&l)
                .set(i64::from(st.consecutive_failures));
            let secs = st
                .last_success
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.upstream_url_last_success.get_or_create(&l).set(secs);
        }
    }

    /// Counts one client request once its answer is known.
    pub fn request(&self, upstream: &str, kind: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                upstream: upstream.to_string(),
                kind,
                status: status_class(status),
            })
            .inc();
    }

    /// Counts one registry request sent upstream and what came of it.
    pub fn upstream_answer(&self, upstream: &str, status: Option<u16>) {
        let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        self.upstream_requests
            .get_or_create(&UpstreamStatusLabels {
                upstream: upstream.to_string(),
                status,
            })
            .inc();
    }
}

/// `2xx`, `3xx`, `4xx` or `5xx` (anything else counts as `5xx`: no
/// well-behaved answer has it).
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_render_with_their_labels_and_units() {
        let m = Metrics::new();
        m.cache_hits.get_or_create(&UpstreamLabel::of("docker.io")).inc_by(3);
        m.served_bytes
            .get_or_create(&ServedLabels {
                upstream: "docker.io".into(),
                source: "cache",
            })
            .inc_by(42);
        m.request("ghcr.io", "blob", 206);
        m.evicted_bytes.inc_by(7);
        m.cache_bytes.set(99);
        let text = m.render();
        for line in [
            "regmirror_cache_hits_total{upstream=\"docker.io\"} 3",
            "regmirror_served_bytes_total{upstream=\"docker.io\",source=\"cache\"} 42",
            "regmirror_requests_total{upstream=\"ghcr.io\",kind=\"blob\",status=\"2xx\"} 1",
            "regmirror_evicted_bytes_total 7",
            "regmirror_evicted_blobs_total 0",
            "regmirror_cache_bytes 99",
            "regmirror_disk_full_total 0",
            "regmirror_connections_refused_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(307), "3xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(508), "5xx");
        assert_eq!(status_class(0), "5xx");
    }
}
