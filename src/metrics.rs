//! Process-wide counters, exported in Prometheus text format on `/metrics`.
//!
//! Counters only: cheap atomics that any module may bump without locking.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// For gauges: the value now, not a sum.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

pub struct Metrics {
    pub requests: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Requests that joined a download another request had started.
    pub cache_joins: Counter,
    pub upstream_requests: Counter,
    pub upstream_fetches: Counter,
    /// Downloads aborted because the bytes were short, broken or did not match their digest.
    pub verify_failures: Counter,
    pub stale_served: Counter,
    pub bytes_fetched: Counter,
    pub bytes_served: Counter,
    /// Content deleted to keep the store under `cache.max_size` (or a full disk).
    pub evicted_blobs: Counter,
    pub evicted_bytes: Counter,
    /// Downloads served from upstream without being stored, for lack of disk space.
    pub disk_full: Counter,
    /// Gauge: bytes of content in the store, as the recency index counts them.
    pub cache_bytes: Counter,
    /// Connections closed at once because the client address is not in `[access] allow`.
    pub connections_refused: Counter,
}

pub static METRICS: Metrics = Metrics {
    requests: Counter::new(),
    cache_hits: Counter::new(),
    cache_misses: Counter::new(),
    cache_joins: Counter::new(),
    upstream_requests: Counter::new(),
    upstream_fetches: Counter::new(),
    verify_failures: Counter::new(),
    stale_served: Counter::new(),
    bytes_fetched: Counter::new(),
    bytes_served: Counter::new(),
    evicted_blobs: Counter::new(),
    evicted_bytes: Counter::new(),
    disk_full: Counter::new(),
    cache_bytes: Counter::new(),
    connections_refused: Counter::new(),
};

impl Metrics {
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &Counter); 14] = [
            (
                "regmirror_connections_refused_total",
                "connections from addresses outside [access] allow",
                &self.connections_refused,
            ),
            ("regmirror_requests_total", "HTTP requests received", &self.requests),
            (
                "regmirror_cache_hits_total",
                "content served from the store",
                &self.cache_hits,
            ),
            (
                "regmirror_cache_misses_total",
                "downloads started for missing content",
                &self.cache_misses,
            ),
            (
                "regmirror_cache_joins_total",
                "requests that joined a running download",
                &self.cache_joins,
            ),
            (
                "regmirror_upstream_requests_total",
                "requests sent upstream",
                &self.upstream_requests,
            ),
            (
                "regmirror_upstream_fetches_total",
                "upstream bodies downloaded into the store",
                &self.upstream_fetches,
            ),
            (
                "regmirror_verify_failures_total",
                "downloads aborted as short, broken or corrupt",
                &self.verify_failures,
            ),
            (
                "regmirror_stale_served_total",
                "tags served from cache because upstream failed",
                &self.stale_served,
            ),
            (
                "regmirror_bytes_fetched_total",
                "bytes downloaded from upstream and stored",
                &self.bytes_fetched,
            ),
            (
                "regmirror_bytes_served_total",
                "bytes sent to clients",
                &self.bytes_served,
            ),
            (
                "regmirror_evicted_blobs_total",
                "blobs deleted to stay under cache.max_size or free a full disk",
                &self.evicted_blobs,
            ),
            (
                "regmirror_evicted_bytes_total",
                "bytes deleted to stay under cache.max_size or free a full disk",
                &self.evicted_bytes,
            ),
            (
                "regmirror_disk_full_total",
                "downloads served without caching because the disk was full",
                &self.disk_full,
            ),
        ];
        let mut out = String::new();
        for (name, help, c) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                c.get()
            ));
        }
        out.push_str(&format!(
            "# HELP regmirror_cache_bytes bytes of content in the store\n# TYPE regmirror_cache_bytes gauge\nregmirror_cache_bytes {}\n",
            self.cache_bytes.get()
        ));
        out
    }
}
