//! Hot manifests in memory: the bytes of recently served manifests with
//! what the store says of them (media type, provenance), so that a warm
//! manifest request touches no file system.
//!
//! Every pull starts with manifest requests, and a fleet of clients sends
//! them by the thousand; each one read from the store costs several
//! blocking-pool round trips (open, media type, provenance, read). An entry
//! here answers [`Cache::stat`](super::Cache::stat) and
//! [`Cache::open_stored`](super::Cache::open_stored) instead, so access
//! decisions (rule 11) still see the `public` flag and still run for every
//! request: only where the answer comes from changes.
//!
//! Content is immutable under its digest, so an entry never goes stale in
//! its bytes; but the store may lose it (eviction, or `regmirror cache`
//! commands run by another process). Entries are therefore trusted for
//! [`HOT_TTL`] only, then read from the store again: a deletion shows
//! within that time. Bounded by count and by bytes, least recently used
//! first out.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;

use crate::reference::Digest;

/// Manifests larger than this are served from the store every time.
pub const HOT_MAX_ENTRY: u64 = 512 * 1024;
/// The most manifest bytes held in memory.
pub const HOT_MAX_BYTES: usize = 32 << 20;
/// The most manifests held in memory.
pub const HOT_MAX_ENTRIES: usize = 8192;
/// How long an entry answers without the store being asked again.
pub const HOT_TTL: Duration = Duration::from_secs(1);

/// A manifest held in memory: its bytes and what the store records of it.
#[derive(Clone, Debug)]
pub struct HotManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub public: bool,
}

struct Entry {
    manifest: HotManifest,
    until: Instant,
}

pub struct HotManifests {
    inner: Mutex<Inner>,
}

struct Inner {
    lru: LruCache<Digest, Entry>,
    bytes: usize,
}

impl Default for HotManifests {
    fn default() -> Self {
        let cap = NonZeroUsize::new(HOT_MAX_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        HotManifests {
            inner: Mutex::new(Inner {
                lru: LruCache::new(cap),
                bytes: 0,
            }),
        }
    }
}

impl HotManifests {
    /// The manifest under `d`, when held and still trusted.
    pub fn get(&self, d: &Digest) -> Option<HotManifest> {
        let now = Instant::now();
        let mut inner = super::lock(&self.inner);
        let fresh = inner.lru.get(d).map(|e| e.until > now)?;
        if fresh {
            return inner.lru.peek(d).map(|e| e.manifest.clone());
        }
        inner.remove(d);
        None
    }

    /// Holds `manifest` under `d` (read from the store just now).
    pub fn insert(&self, d: &Digest, manifest: HotManifest) {
        self.insert_until(d, manifest, Instant::now() + HOT_TTL);
    }

    fn insert_until(&self, d: &Digest, manifest: HotManifest, until: Instant) {
        let len = manifest.bytes.len();
        if len as u64 > HOT_MAX_ENTRY {
            return;
        }
        let mut inner = super::lock(&self.inner);
        inner.remove(d);
        while inner.bytes + len > HOT_MAX_BYTES {
            match inner.lru.pop_lru() {
                Some((_, e)) => inner.bytes -= e.manifest.bytes.len(),
                None => break,
            }
        }
        let entry = Entry { manifest, until };
        if let Some((_, pushed_out)) = inner.lru.push(d.clone(), entry) {
            inner.bytes -= pushed_out.manifest.bytes.len();
        }
        inner.bytes += len;
    }

    /// The store recorded `d` as public: so does the entry, if held.
    pub fn mark_public(&self, d: &Digest) {
        if let Some(e) = super::lock(&self.inner).lru.peek_mut(d) {
            e.manifest.public = true;
        }
    }

    /// `d` is no longer to be answered from memory.
    pub fn forget(&self, d: &Digest) {
        super::lock(&self.inner).remove(d);
    }

    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        super::lock(&self.inner).bytes
    }
}

impl Inner {
    fn remove(&mut self, d: &Digest) {
        if let Some(e) = self.lru.pop(d) {
            self.bytes -= e.manifest.bytes.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(len: usize, public: bool) -> HotManifest {
        HotManifest {
            bytes: Bytes::from(vec![b'x'; len]),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            public,
        }
    }

    #[test]
    fn holds_small_manifests_and_their_provenance() {
        let hot = HotManifests::default();
        let d = Digest::of(b"a");
        assert!(hot.get(&d).is_none());
        hot.insert(&d, manifest(10, false));
        assert!(!hot.get(&d).unwrap().public);
        hot.mark_public(&d);
        assert!(hot.get(&d).unwrap().public, "provenance follows the store");
        hot.forget(&d);
        assert!(hot.get(&d).is_none());
        assert_eq!(hot.held_bytes(), 0);

        let big = Digest::of(b"big");
        hot.insert(&big, manifest(HOT_MAX_ENTRY as usize + 1, true));
        assert!(hot.get(&big).is_none(), "large manifests stay on disk");
    }

    #[test]
    fn stays_within_its_byte_budget_least_recent_first() {
        let hot = HotManifests::default();
        let each = HOT_MAX_ENTRY as usize;
        let n = HOT_MAX_BYTES / each + 3;
        let digests: Vec<Digest> = (0..n).map(|i| Digest::of(format!("{i}").as_bytes())).collect();
        for d in &digests {
            hot.insert(d, manifest(each, true));
            // Re-reading the first keeps it recent.
            let _ = hot.get(&digests[0]);
        }
        assert!(hot.held_bytes() <= HOT_MAX_BYTES);
        assert!(hot.get(&digests[0]).is_some(), "recently used stays");
        assert!(hot.get(&digests[1]).is_none(), "least recently used went first");
        assert!(hot.get(&digests[n - 1]).is_some());
    }

    #[test]
    fn an_entry_past_its_time_is_asked_of_the_store_again() {
        let hot = HotManifests::default();
        let d = Digest::of(b"a");
        hot.insert_until(&d, manifest(10, true), Instant::now());
        assert!(hot.get(&d).is_none());
        assert_eq!(hot.held_bytes(), 0, "an expired entry is dropped when found");
    }

    #[test]
    fn reinserting_counts_bytes_once() {
        let hot = HotManifests::default();
        let d = Digest::of(b"a");
        hot.insert(&d, manifest(100, true));
        hot.insert(&d, manifest(100, true));
        assert_eq!(hot.held_bytes(), 100);
    }
}
