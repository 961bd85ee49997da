//! Keeping the store under `cache.max_size`: least-recently-used content is
//! deleted, layers before manifests, down to the low-water mark.
//!
//! Serving never waits for any of it. A hit or a commit only notes the fact
//! in memory (a `std` mutex held for a push, never across I/O); one
//! background task, the evictor, writes those notes to the recency index
//! (`index`) in batches, reads the total, and deletes what must go. The
//! index is opened by that task too, so start-up does not wait for it and
//! start-to-first-response does not grow with the number of blobs.
//!
//! Deleting content a client is reading is safe: an opened blob stays
//! readable after it is deleted (the store suite checks this), and content
//! still downloading is not in the store or the index yet.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::blob_store::BlobStore;
use super::index::{Change, Class, Index};
use crate::metrics::METRICS;
use crate::reference::Digest;

/// How often noted uses and additions reach the index when nothing else
/// wakes the evictor.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The size bound. `low_water` is where eviction stops once started, so
/// that it runs in bursts rather than on every new blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_size: u64,
    pub low_water: u64,
}

impl Limits {
    /// `max_size` with the default low-water mark of 90%.
    pub fn new(max_size: u64) -> Limits {
        Limits {
            max_size,
            low_water: max_size / 10 * 9,
        }
    }
}

/// The cache's part in eviction: notes of uses and additions, and the
/// evictor that applies them.
pub struct Lifecycle {
    limits: Limits,
    index: OnceLock<Arc<Index>>,
    pending: Mutex<Pending>,
    /// Content a pushed (local) repository holds: never evicted, and not
    /// counted towards `max_size` (local namespaces have their own quota).
    pinned: Mutex<std::collections::HashSet<String>>,
    wake: Arc<Notify>,
    /// Bytes a write could not get (ENOSPC) since the evictor last looked.
    pressure: AtomicU64,
    /// Evictions are `evict` events: false for a read cache in front of a
    /// bucket, whose evictions leave the content cached (in the bucket).
    announce: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Pending {
    changes: Vec<Change>,
    /// digest → last use, deduplicated: a hot blob is one entry per flush.
    touches: HashMap<String, u64>,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
    pub before: u64,
    pub after: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Lifecycle {
    pub fn new(limits: Limits) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            limits,
            index: OnceLock::new(),
            pending: Mutex::new(Pending::default()),
            pinned: Mutex::new(Default::default()),
            wake: Arc::new(Notify::new()),
            pressure: AtomicU64::new(0),
            announce: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// What this evicts is a local copy of content kept elsewhere: no
    /// `evict` event for it.
    pub fn evicts_copies_only(&self) {
        self.announce.store(false, Ordering::Relaxed);
    }

    /// The recency index, once the evictor has opened it.
    pub fn index(&self) -> Option<Arc<Index>> {
        self.index.get().cloned()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A hit: `d` was used now.
    pub fn touch(&self, d: &Digest) {
        let now = now_ms();
        let mut pending = super::lock(&self.pending);
        match pending.touches.get_mut(d.as_str()) {
            Some(at) => *at = now,
            None => {
                pending.touches.insert(d.to_string(), now);
            }
        }
    }

    /// A pushed repository holds `d`: it leaves the LRU for good.
    pub fn pin(&self, d: &Digest) {
        if super::lock(&self.pinned).insert(d.to_string()) {
            super::lock(&self.pending)
                .changes
                .push(Change::Remove { digest: d.to_string() });
            self.wake.notify_one();
        }
    }

    /// `d` was committed to the store.
    pub fn added(&self, d: &Digest, size: u64, class: Class) {
        super::lock(&self.pending).changes.push(Change::Add {
            digest: d.to_string(),
            size,
            class,
            at_ms: now_ms(),
        });
        self.wake.notify_one();
    }

    /// A write failed for lack of space: the evictor frees at least
    /// `needed` bytes (and a tenth of the store) however far under the
    /// bound the store is, since the disk is smaller than the bound.
    pub fn disk_full(&self, needed: u64) {
        self.pressure.fetch_max(needed.max(1), Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Writes every pending note to the index now (at shutdown, and before
    /// each eviction pass). Does nothing before the index is open.
    pub async fn flush(&self) -> io::Result<()> {
        let Some(index) = self.index.get().cloned() else {
            return Ok(());
        };
        let mut changes = {
            let mut p = super::lock(&self.pending);
            let mut changes = std::mem::take(&mut p.changes);
            changes.extend(p.touches.drain().map(|(digest, at_ms)| Change::Touch { digest, at_ms }));
            changes
        };
        if changes.is_empty() {
            return Ok(());
        }
        let result = {
            let index = index.clone();
            let batch = changes.clone();
            tokio::task::spawn_blocking(move || index.apply(&batch))
                .await
                .map_err(io::Error::other)?
        };
        if let Err(e) = result {
            // Keep the notes for the next try rather than lose them.
            let mut p = super::lock(&self.pending);
            changes.append(&mut p.changes);
            p.changes = changes;
            return Err(e);
        }
        Ok(())
    }

    /// Starts the evictor: it opens the index at `path` (importing content
    /// that predates it, in the background), then keeps the store under
    /// the bound. It ends when the cache is dropped.
    pub fn spawn(self: &Arc<Self>, blobs: Arc<dyn BlobStore>, path: PathBuf) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            if let Err(e) = run(weak, blobs, path).await {
                tracing::error!(error = %e, "evictor stopped: the cache is no longer kept under cache.max_size");
            }
        })
    }
}

async fn run(weak: Weak<Lifecycle>, blobs: Arc<dyn BlobStore>, path: PathBuf) -> io::Result<()> {
    let (index, fresh) = open_index(path).await?;
    let index = Arc::new(index);
    if fresh {
        import(&index, blobs.as_ref()).await?;
    }
    match weak.upgrade() {
        Some(life) => {
            let _ = life.index.set(index.clone());
        }
        None => return Ok(()),
    }
    loop {
        let Some(life) = weak.upgrade() else {
            return Ok(());
        };
        if let Err(e) = life.flush().await {
            tracing::warn!(error = %e, "could not update the cache index; retrying");
        }
        let total = {
            let index = index.clone();
            tokio::task::spawn_blocking(move || index.total())
                .await
                .map_err(io::Error::other)??
        };
        METRICS.cache_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        let pressure = life.pressure.swap(0, Ordering::Relaxed);
        let limits = life.limits;
        let target = if total > limits.max_size {
            Some(limits.low_water)
        } else if pressure > 0 {
            Some(limits.low_water.min(total.saturating_sub(pressure.max(total / 10))))
        } else {
            None
        };
        if let Some(target) = target.filter(|t| total > *t) {
            let why = if pressure > 0 {
                "disk full"
            } else {
                "over cache.max_size"
            };
            let keep =
                |d: &str| super::lock(&life.pinned).contains(d) || super::lock(&life.pending).touches.contains_key(d);
            let announce = life.announce.load(Ordering::Relaxed);
            match evict_to(&index, blobs.as_ref(), target, &keep, announce).await {
                Ok(done) if done.blobs > 0 => {
                    tracing::info!(
                        why,
                        blobs = done.blobs,
                        bytes = done.bytes,
                        before = done.before,
                        after = done.after,
                        "evicted least recently used content"
                    );
                    // Until under the target: what was spared may go now.
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(why, error = %e, "eviction failed; retrying"),
            }
        }
        // Wait without keeping the cache alive.
        let wake = life.wake.clone();
        drop(life);
        let _ = tokio::time::timeout(FLUSH_EVERY, wake.notified()).await;
    }
}

/// Opens the index; an index that cannot be opened (damaged) is moved
/// aside and rebuilt from the store, since it only describes the content.
async fn open_index(path: PathBuf) -> io::Result<(Index, bool)> {
    tokio::task::spawn_blocking(move || match Index::open(&path) {
        Ok(r) => Ok(r),
        Err(e) => {
            let aside = path.with_extension(format!("broken-{}", now_ms()));
            tracing::warn!(error = %e, moved_to = %aside.display(), "cache index unreadable; rebuilding it from the store");
            std::fs::rename(&path, &aside)?;
            Index::open(&path)
        }
    })
    .await
    .map_err(io::Error::other)?
}

/// Adds content stored before the index existed, with its file time as
/// last use. Runs once per store, beside serving.
async fn import(index: &Arc<Index>, blobs: &dyn BlobStore) -> io::Result<()> {
    let listed = blobs.list().await?;
    let n = listed.len();
    let changes: Vec<Change> = listed
        .into_iter()
        .map(|b| Change::Add {
            digest: b.digest.to_string(),
            size: b.size,
            class: if b.manifest { Class::Manifest } else { Class::Layer },
            at_ms: b.modified_ms,
        })
        .collect();
    let index = index.clone();
    tokio::task::spawn_blocking(move || {
        index.apply(&changes)?;
        index.mark_imported()
    })
    .await
    .map_err(io::Error::other)??;
    if n > 0 {
        tracing::info!(blobs = n, "indexed content stored before the cache index existed");
    }
    Ok(())
}

/// Deletes least-recently-used content, layers first, until the index
/// total is at most `target`; `keep` spares digests used since the index
/// last heard of them; `announce`: each is an `evict` event. Shared by the
/// evictor and `regmirror cache gc`.
pub async fn evict_to(
    index: &Arc<Index>,
    blobs: &dyn BlobStore,
    target: u64,
    keep: &(dyn Fn(&str) -> bool + Sync),
    announce: bool,
) -> io::Result<Evicted> {
    let before = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || index.total())
            .await
            .map_err(io::Error::other)??
    };
    let mut done = Evicted {
        before,
        after: before,
        ..Default::default()
    };
    if before <= target {
        return Ok(done);
    }
    let victims = {
        let index = index.clone();
        let need = before - target;
        tokio::task::spawn_blocking(move || index.oldest(need))
            .await
            .map_err(io::Error::other)??
    };
    let mut removed = Vec::new();
    for v in victims {
        if keep(&v.digest) {
            continue;
        }
        if let Ok(d) = Digest::parse(&v.digest) {
            if let Err(e) = blobs.delete(&d).await {
                tracing::warn!(digest = %d, error = %e, "could not evict");
                continue;
            }
        }
        done.blobs += 1;
        done.bytes += v.size;
        if announce && crate::events::wanted(crate::events::Kind::Evict) {
            let mut event = crate::events::Event::new(crate::events::Kind::Evict);
            event.digest = Some(v.digest.clone());
            event.size = Some(v.size);
            crate::events::emit(event);
        }
        removed.push(Change::Remove { digest: v.digest });
    }
    let after = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || {
            index.apply(&removed)?;
            index.total()
        })
        .await
        .map_err(io::Error::other)??
    };
    done.after = after;
    METRICS.evicted_blobs.inc_by(done.blobs);
    METRICS.evicted_bytes.inc_by(done.bytes);
    METRICS.cache_bytes.set(i64::try_from(after).unwrap_or(i64::MAX));
    Ok(done)
}
