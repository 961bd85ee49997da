//! The bucket's size bound (`cache.bucket_max_size`): least recently used
//! content leaves the bucket once it holds more, layers before manifests,
//! never what a pushed repository holds.
//!
//! Last use is shared through the bucket: a replica that serves a digest
//! writes an empty `used/<algorithm>/<hex>` marker, at most once per
//! [`MARK_EVERY`] per digest, so the bound costs a PUT per digest per few
//! hours, not one per request. A digest's last use is the newer of its
//! content's and its marker's modification times.
//!
//! One replica at a time evicts: the owner (as `[cluster]` decides owners)
//! of a well-known key. Garage ignores conditional PUTs, so a lease written
//! to the bucket could not be taken safely; members that agree on who the
//! members are agree on the evictor without a write. While views differ
//! (a member joining), two may evict at once: both delete the oldest
//! content, which costs at most a refetch, never a wrong answer.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;

use super::s3::S3Store;
use crate::metrics::METRICS;
use crate::reference::Digest;

/// How often a replica renews a digest's use marker while it serves it.
pub const MARK_EVERY: Duration = Duration::from_secs(6 * 3600);
/// How often the evictor looks at the bucket's size.
const CHECK_EVERY: Duration = Duration::from_secs(60);
/// When it looks first: once `peers_dns` had a moment to answer.
const FIRST_CHECK_AFTER: Duration = Duration::from_secs(3);
/// The key whose owner evicts.
const EVICTOR_KEY: &[u8] = b"regmirror bucket evictor";
/// Use markers remembered per replica (older ones are written again).
const MARKS_KEPT: usize = 100_000;

/// One digest in the bucket as the bound sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketEntry {
    pub digest: Digest,
    pub size: u64,
    pub manifest: bool,
    pub last_use_ms: u64,
}

/// What a pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BucketEvicted {
    pub blobs: u64,
    pub bytes: u64,
    pub before: u64,
    pub after: u64,
}

/// Writes use markers, each digest at most once per [`MARK_EVERY`].
pub struct UseMarks {
    bucket: Arc<S3Store>,
    marked: Mutex<lru::LruCache<String, std::time::Instant>>,
}

impl UseMarks {
    pub fn new(bucket: Arc<S3Store>) -> Self {
        UseMarks {
            bucket,
            marked: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(MARKS_KEPT).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    /// `d` was served or stored now. The marker is written in the
    /// background: a failure is logged and tried again at the next use.
    pub fn used(&self, d: &Digest) {
        let now = std::time::Instant::now();
        {
            let mut marked = super::lock(&self.marked);
            if marked
                .get(d.as_str())
                .is_some_and(|at| now.duration_since(*at) < MARK_EVERY)
            {
                return;
            }
            marked.put(d.to_string(), now);
        }
        let (bucket, d) = (self.bucket.clone(), d.clone());
        tokio::spawn(async move {
            if let Err(e) = bucket.put_small(&S3Store::used_key(&d), Bytes::new()).await {
                tracing::debug!(digest = %d, error = %e, "could not write a use marker");
            }
        });
    }
}

/// Every digest in the bucket with its size and last use: two listings.
pub async fn usage(bucket: &S3Store) -> io::Result<Vec<BucketEntry>> {
    let blobs = bucket.list_blobs().await?;
    let mut used: HashMap<String, u64> = HashMap::new();
    for o in bucket.list_all(&Path::from("used")).await? {
        let parts: Vec<_> = o.location.parts().collect();
        if let [_, algo, hex] = parts.as_slice() {
            used.insert(
                format!("{}:{}", algo.as_ref(), hex.as_ref()),
                o.last_modified.timestamp_millis().max(0) as u64,
            );
        }
    }
    Ok(blobs
        .into_iter()
        .map(|b| BucketEntry {
            last_use_ms: b.modified_ms.max(used.get(b.digest.as_str()).copied().unwrap_or(0)),
            size: b.size,
            manifest: b.manifest,
            digest: b.digest,
        })
        .collect())
}

/// Deletes least recently used content, layers first, until the bucket
/// holds at most `target` bytes; `keep` spares what must stay (pushed
/// content). `delete` removes one digest (from the bucket and whatever
/// copies the caller keeps).
pub async fn evict_bucket<F, Fut>(
    entries: Vec<BucketEntry>,
    target: u64,
    keep: &(dyn Fn(&Digest) -> bool + Sync),
    delete: F,
) -> BucketEvicted
where
    F: Fn(Digest) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    let before: u64 = entries.iter().map(|e| e.size).sum();
    let mut done = BucketEvicted {
        before,
        after: before,
        ..Default::default()
    };
    let mut victims: Vec<BucketEntry> = entries.into_iter().filter(|e| !keep(&e.digest)).collect();
    // Layers and configs before any manifest, each oldest first.
    victims.sort_by_key(|e| (e.manifest, e.last_use_ms));
    for v in victims {
        if done.after <= target {
            break;
        }
        if let Err(e) = delete(v.digest.clone()).await {
            tracing::warn!(digest = %v.digest, error = %e, "could not evict from the bucket");
            continue;
        }
        done.blobs += 1;
        done.bytes += v.size;
        done.after -= v.size;
        if crate::events::wanted(crate::events::Kind::Evict) {
            let mut event = crate::events::Event::new(crate::events::Kind::Evict);
            event.digest = Some(v.digest.to_string());
            event.size = Some(v.size);
            crate::events::emit(event);
        }
    }
    METRICS.bucket_evicted_blobs.inc_by(done.blobs);
    METRICS.bucket_evicted_bytes.inc_by(done.bytes);
    METRICS.bucket_bytes.set(i64::try_from(done.after).unwrap_or(i64::MAX));
    done
}

/// The digest whose owner is the evictor (see the module doc).
pub fn evictor_key() -> Digest {
    Digest::of(EVICTOR_KEY)
}

/// How one replica keeps the bucket under its bound.
pub struct BucketBound {
    pub max_size: u64,
    pub low_water: u64,
}

/// Runs for as long as `cache` lives: every minute, if this replica is the
/// evictor (`is_evictor`), measures the bucket and evicts down to low water
/// when it is over `max_size`.
pub fn spawn<K, D, DF, E>(bound: BucketBound, bucket: Arc<S3Store>, is_evictor: E, held: K, delete: D)
where
    E: Fn() -> bool + Send + Sync + 'static,
    K: Fn() -> futures_util::future::BoxFuture<'static, io::Result<std::collections::HashSet<Digest>>>
        + Send
        + Sync
        + 'static,
    D: Fn(Digest) -> DF + Send + Sync + 'static,
    DF: std::future::Future<Output = io::Result<()>> + Send,
{
    tokio::spawn(async move {
        // The first pass soon after start (members found), then every minute.
        tokio::time::sleep(FIRST_CHECK_AFTER).await;
        loop {
            if is_evictor() {
                if let Err(e) = pass(&bound, &bucket, &held, &delete).await {
                    tracing::warn!(error = %e, "bucket eviction failed; trying again in a minute");
                }
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    });
}

async fn pass<K, D, DF>(bound: &BucketBound, bucket: &S3Store, held: &K, delete: &D) -> io::Result<()>
where
    K: Fn() -> futures_util::future::BoxFuture<'static, io::Result<std::collections::HashSet<Digest>>>,
    D: Fn(Digest) -> DF,
    DF: std::future::Future<Output = io::Result<()>>,
{
    let entries = usage(bucket).await?;
    let total: u64 = entries.iter().map(|e| e.size).sum();
    METRICS.bucket_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
    if total <= bound.max_size {
        return Ok(());
    }
    let keep = held().await?;
    let done = evict_bucket(entries, bound.low_water, &|d| keep.contains(d), delete).await;
    tracing::info!(
        blobs = done.blobs,
        bytes = done.bytes,
        before = done.before,
        after = done.after,
        "evicted least recently used content from the bucket (over cache.bucket_max_size)"
    );
    Ok(())
}
