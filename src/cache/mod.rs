//! The content cache: verified, content-addressed bytes (`blob_store`),
//! what upstream last said of tags (`meta_store`), their disk
//! backend (`disk`) and their S3 backend (`s3`, behind a local read cache:
//! `tiered`), the single-flight fetch that fills the cache
//! (`fetch`), the streams that serve from it (`served`), and the size bound:
//! a recency index (`index`) and the evictor that keeps the store under
//! `cache.max_size` (`evict`).
//!
//! The cache never sees a URL: callers hand it a digest and a function that
//! opens a byte stream, and it calls that function at most once per cold
//! digest however many clients ask at the same time. Handlers reach the
//! stores only through [`Cache`]'s methods, and never name a backend.

pub mod blob_store;
pub mod bucket_evict;
pub mod disk;
mod disk_hosted;
pub mod error;
pub mod evict;
pub mod fetch;
pub mod hosted_store;
pub mod hot;
pub mod index;
pub mod listing;
pub mod meta_store;
mod progress;
pub mod s3;
mod s3_hosted;
pub mod served;
pub mod source;
#[doc(hidden)]
pub mod store_suite;
pub mod tiered;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

pub use blob_store::{BlobInfo, BlobStore, ByteStream};
pub use disk::DiskStore;
pub use error::FetchError;
pub use evict::{Lifecycle, Limits};
pub use hosted_store::{HostedStore, Link};
pub use meta_store::{MetaStore, RepoKey, TagRecord};
pub use served::{Lookup, Served, ServedInfo};
pub use source::{OpenFuture, Source, SourceError};

use crate::reference::{Digest, Tag};

/// The recency index's file under `cache.dir`.
pub const INDEX_FILE: &str = "index.redb";

pub struct Cache {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    /// Pushed repositories' records; `None` for a cache of pulls only
    /// (unit tests of the fetch path).
    hosted: Option<Arc<dyn HostedStore>>,
    inflight: Mutex<HashMap<Digest, Arc<fetch::Inflight>>>,
    /// Permits for upstream downloads: a client that asks for many cold
    /// digests and leaves cannot start more than this many at once (a
    /// download nobody waits for any more still holds its permit).
    downloads: Arc<Semaphore>,
    /// Repositories with tag records, per upstream: walked from the store
    /// once, on first use, then kept up to date as tags are recorded.
    repositories: Mutex<HashMap<String, RepoIndex>>,
    /// Recency notes and the evictor; `None` for a cache without a bound
    /// (unit tests of the fetch path).
    life: Option<Arc<Lifecycle>>,
    /// The S3 backend's shared last-use markers, for the bucket's bound.
    uses: Option<Arc<bucket_evict::UseMarks>>,
    /// The bucket and the store that deletes from it and the local cache,
    /// for the bucket's bound; `None` on the disk backend.
    bucket: Option<(Arc<s3::S3Store>, Arc<tiered::TieredStore>)>,
    /// Pushed content is kept out of eviction: true where the store it is
    /// evicted from is its only copy (disk), false where that is a read
    /// cache in front of a bucket.
    pin_pushed: bool,
    /// Recently served manifests, answered without the store.
    hot: hot::HotManifests,
    /// Tag records written lately, one per media type, so that upstream
    /// repeating the same answer does not rewrite the same file on every tag
    /// request, and a tag request can ask upstream whether the answer still
    /// holds without reading the store.
    written_tags: Mutex<lru::LruCache<TagKey, Vec<(TagRecord, std::time::Instant)>>>,
}

/// (upstream, repository, tag) of tag records.
type TagKey = (String, String, String);

/// How long a tag record written is not written again with the same
/// answer: its `seen_ms` (which only ranks equally preferred answers when
/// upstream is down) is at most this old.
const TAG_REWRITE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

fn same_answer(a: &TagRecord, b: &TagRecord) -> bool {
    a.digest == b.digest && a.media_type == b.media_type && a.size == b.size && a.public == b.public
}

#[derive(Default)]
struct RepoIndex {
    walked: bool,
    names: BTreeSet<String>,
}

impl Cache {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, download_concurrency: usize) -> Self {
        Cache {
            blobs,
            meta,
            hosted: None,
            inflight: Mutex::new(HashMap::new()),
            downloads: Arc::new(Semaphore::new(download_concurrency.max(1))),
            repositories: Mutex::new(HashMap::new()),
            life: None,
            uses: None,
            bucket: None,
            pin_pushed: true,
            hot: hot::HotManifests::default(),
            written_tags: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4096).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }

    /// The cache on a disk directory (the only backend so far), with
    /// metadata kept under an old namespace name moved to its upstream's,
    /// kept under `limits` by an evictor started here. The directory work
    /// runs on a blocking thread; the index opens in the background.
    pub async fn open_disk(
        dir: &Path,
        namespace_moves: Vec<(String, String)>,
        download_concurrency: usize,
        limits: Limits,
    ) -> io::Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let dir = dir.to_path_buf();
        let store = tokio::task::spawn_blocking(move || {
            let store = DiskStore::open_dir(&dir)?;
            store.migrate_namespaces(&namespace_moves)?;
            Ok::<_, io::Error>(store)
        })
        .await
        .map_err(io::Error::other)??;
        let store = Arc::new(store);
        let mut cache = Cache::new(store.clone(), store.clone(), download_concurrency);
        cache.hosted = Some(store);
        let life = Lifecycle::new(limits);
        life.spawn(cache.blobs.clone(), index_path);
        cache.life = Some(life);
        Ok(cache)
    }

    /// The cache on a bucket shared by every replica, with `dir` as this
    /// replica's local read cache kept under `limits`. Nothing in the
    /// bucket is read or listed here: the first request does that.
    pub async fn open_bucket(
        settings: &crate::config::BucketSettings,
        dir: &Path,
        download_concurrency: usize,
        limits: Limits,
    ) -> io::Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let local_dir = dir.to_path_buf();
        let local = tokio::task::spawn_blocking(move || DiskStore::open_read_cache(&local_dir, INDEX_FILE))
            .await
            .map_err(io::Error::other)??;
        let local = Arc::new(local);
        let bucket = Arc::new(s3::S3Store::connect(settings)?);
        let tiered = Arc::new(tiered::TieredStore::new(local.clone(), bucket.clone()));
        let mut cache = Cache::new(tiered.clone(), bucket.clone(), download_concurrency);
        cache.hosted = Some(bucket.clone());
        cache.pin_pushed = false;
        if settings.max_size.is_some() {
            cache.uses = Some(Arc::new(bucket_evict::UseMarks::new(bucket.clone())));
        }
        cache.bucket = Some((bucket, tiered.clone()));
        let life = Lifecycle::new(limits);
        life.evicts_copies_only();
        life.spawn(local, index_path);
        tiered.set_lifecycle(life.clone());
        cache.life = Some(life);
        Ok(cache)
    }

    /// The records of pushed repositories.
    pub fn hosted(&self) -> io::Result<&dyn HostedStore> {
        self.hosted
            .as_deref()
            .ok_or_else(|| io::Error::other("this store keeps no pushed repositories"))
    }

    /// A pushed repository holds `d`: it is never evicted from now on.
    pub fn pin(&self, d: &Digest) {
        if !self.pin_pushed {
            return;
        }
        if let Some(life) = &self.life {
            life.pin(d);
        }
    }

    /// Starts the file an upload session writes to.
    pub async fn begin_upload(&self, id: &str) -> io::Result<Box<dyn blob_store::PendingBlob>> {
        self.blobs.begin_upload(id).await
    }

    /// Makes a finished upload, verified against `d` by the caller,
    /// visible under `d`, and keeps it out of eviction.
    pub async fn commit_upload(&self, upload: Box<dyn blob_store::PendingBlob>, d: &Digest) -> io::Result<()> {
        upload.commit_to(d, None).await?;
        self.pin(d);
        Ok(())
    }

    /// Stores a pushed manifest (bytes the caller hashed to `d`) with its
    /// media type, and keeps it out of eviction.
    pub async fn store_manifest(&self, d: &Digest, bytes: bytes::Bytes, media_type: &str) -> io::Result<()> {
        let stored = self.blobs.stat(d).await?;
        if stored.as_ref().and_then(|i| i.media_type.as_deref()) != Some(media_type) {
            let mut pending = self.blobs.begin(d).await?;
            pending.write(bytes).await?;
            pending.commit(Some(media_type)).await?;
            self.hot.forget(d);
        }
        self.pin(d);
        Ok(())
    }

    /// Writes pending recency notes to the index (at shutdown), and marks
    /// a read cache in front of a bucket closed cleanly.
    pub async fn flush(&self) {
        if let Some(life) = &self.life {
            if let Err(e) = life.flush().await {
                tracing::warn!(error = %e, "could not write the cache index at shutdown");
                return;
            }
        }
        if let Some((_, tiered)) = &self.bucket {
            if let Err(e) = tiered.close() {
                tracing::warn!(error = %e, "could not mark the local read cache closed cleanly; it is emptied at the next start");
            }
        }
    }

    fn touch(&self, d: &Digest) {
        if let Some(life) = &self.life {
            life.touch(d);
        }
        if let Some(uses) = &self.uses {
            uses.used(d);
        }
    }

    /// Keeps the bucket under `max_size` (`cache.bucket_max_size`) from
    /// now on, evicting only while `is_evictor` says this replica is the
    /// one (see [`bucket_evict`]); `namespaces` are the pushed ones, whose
    /// content is never evicted. Nothing on the disk backend.
    pub fn spawn_bucket_bound(
        &self,
        max_size: u64,
        namespaces: Vec<String>,
        is_evictor: impl Fn() -> bool + Send + Sync + 'static,
    ) {
        let Some((bucket, tiered)) = self.bucket.clone() else {
            return;
        };
        let hosted = bucket.clone();
        let namespaces = Arc::new(namespaces);
        bucket_evict::spawn(
            bucket_evict::BucketBound {
                max_size,
                low_water: max_size / 10 * 9,
            },
            bucket,
            is_evictor,
            move || {
                let (hosted, namespaces) = (hosted.clone(), namespaces.clone());
                Box::pin(async move { crate::local::gc::held(hosted.as_ref(), &namespaces).await })
            },
            move |d| {
                let tiered = tiered.clone();
                async move { tiered.delete(&d).await }
            },
        );
    }

    /// Content was committed: counted towards the bound from now on.
    pub(crate) fn added(&self, d: &Digest, size: u64, manifest: bool) {
        if let Some(life) = &self.life {
            let class = if manifest {
                index::Class::Manifest
            } else {
                index::Class::Layer
            };
            life.added(d, size, class);
        }
    }

    /// A write found the disk full: the evictor frees room.
    pub(crate) fn disk_full(&self, needed: u64) {
        if let Some(life) = &self.life {
            life.disk_full(needed);
        }
    }

    /// What is stored under `d`, without opening it.
    /// A hit counts as a use for eviction.
    pub async fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>, FetchError> {
        if let Some(h) = self.hot.get(d) {
            self.touch(d);
            return Ok(Some(BlobInfo {
                size: h.bytes.len() as u64,
                media_type: Some(h.media_type),
                public: h.public,
            }));
        }
        let info = self.blobs.stat(d).await.map_err(|e| FetchError::store(d, "stat", e))?;
        if info.is_some() {
            self.touch(d);
        }
        Ok(info)
    }

    /// Whether the store takes new content now, for readiness checks.
    pub async fn check_writable(&self) -> io::Result<()> {
        self.blobs.check_writable().await
    }

    /// True while a download of `d` is in progress (joining it would hand
    /// over bytes fetched for another client).
    pub fn downloading(&self, d: &Digest) -> bool {
        lock(&self.inflight).contains_key(d)
    }

    /// Stored content, opened for serving; `None` when not stored. A hit
    /// counts as a use for eviction; what is opened stays readable to the
    /// end even if it is evicted meanwhile.
    /// A small manifest is read whole and kept in memory for the next
    /// requests (see [`hot`]).
    pub async fn open_stored(&self, d: &Digest) -> Result<Option<Served>, FetchError> {
        if let Some(h) = self.hot.get(d) {
            self.touch(d);
            return Ok(Some(Served::memory(h.bytes, Some(h.media_type))));
        }
        let Some(blob) = self.blobs.open(d).await.map_err(|e| FetchError::store(d, "open", e))? else {
            return Ok(None);
        };
        self.touch(d);
        let info = blob.info().clone();
        match info.media_type {
            Some(media_type) if info.size <= hot::HOT_MAX_ENTRY => {
                let bytes = read_whole(blob, info.size)
                    .await
                    .map_err(|e| FetchError::store(d, "read", e))?;
                let manifest = hot::HotManifest {
                    bytes: bytes.clone(),
                    media_type: media_type.clone(),
                    public: info.public,
                };
                self.hot.insert(d, manifest);
                Ok(Some(Served::memory(bytes, Some(media_type))))
            }
            _ => Ok(Some(Served::stored(blob, Lookup::Hit))),
        }
    }

    /// Records the media type of content stored without one. A failure is
    /// logged: the type is asked of upstream again next time.
    pub async fn set_media_type(&self, d: &Digest, media_type: &str) {
        self.hot.forget(d);
        if let Err(e) = self.blobs.set_media_type(d, media_type).await {
            tracing::warn!(digest = %d, error = %e, "could not record a media type");
        }
    }

    /// Records that stored content is public. A failure is logged: the
    /// content is then proven public again when next asked for.
    pub async fn mark_public(&self, d: &Digest) {
        match self.blobs.mark_public(d).await {
            Ok(()) => self.hot.mark_public(d),
            Err(e) => tracing::warn!(digest = %d, error = %e, "could not record provenance"),
        }
    }

    /// Remembers upstream's answer for a tag. A failure is logged, not
    /// returned: the answer is served either way.
    pub async fn record_tag(&self, at: RepoKey<'_>, tag: &Tag, rec: &TagRecord) {
        let key: TagKey = (at.upstream.to_string(), at.repo.to_string(), tag.as_str().to_string());
        let now = std::time::Instant::now();
        let unchanged = lock(&self.written_tags).get(&key).is_some_and(|written| {
            written
                .iter()
                .any(|(last, at)| same_answer(last, rec) && now.duration_since(*at) < TAG_REWRITE_AFTER)
        });
        if unchanged {
            return;
        }
        match self.meta.put_tag(at, tag, rec).await {
            Ok(()) => {
                let mut written = lock(&self.written_tags);
                let records = written.get_or_insert_mut(key, Vec::new);
                records.retain(|(last, _)| last.media_type != rec.media_type);
                records.push((rec.clone(), now));
                drop(written);
                let mut index = lock(&self.repositories);
                index
                    .entry(at.upstream.to_string())
                    .or_default()
                    .names
                    .insert(at.repo.to_string());
            }
            Err(e) => tracing::warn!(repo = %at.repo, %tag, error = %e, "could not record tag"),
        }
    }

    /// What upstream said of `tag` lately, one record per media type, from
    /// memory only: none after a restart until the tag is asked for again.
    /// For asking upstream whether an answer still holds, on every tag
    /// request, without a read of the store.
    pub fn recent_tags(&self, at: RepoKey<'_>, tag: &Tag) -> Vec<TagRecord> {
        let key: TagKey = (at.upstream.to_string(), at.repo.to_string(), tag.as_str().to_string());
        lock(&self.written_tags)
            .peek(&key)
            .map(|written| written.iter().map(|(r, _)| r.clone()).collect())
            .unwrap_or_default()
    }

    /// What upstream last said of `tag`, one record per media type.
    pub async fn last_tags(&self, at: RepoKey<'_>, tag: &Tag) -> Vec<TagRecord> {
        match self.meta.get_tags(at, tag).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(repo = %at.repo, %tag, error = %e, "could not read tag records");
                Vec::new()
            }
        }
    }

    pub async fn record_tag_list(&self, at: RepoKey<'_>, key: &str, body: &[u8]) {
        if let Err(e) = self.meta.put_tag_list(at, key, body).await {
            tracing::warn!(repo = %at.repo, error = %e, "could not keep the tag list");
        }
    }

    pub async fn last_tag_list(&self, at: RepoKey<'_>, key: &str) -> Option<Vec<u8>> {
        match self.meta.get_tag_list(at, key).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(repo = %at.repo, error = %e, "could not read the kept tag list");
                None
            }
        }
    }

    /// Every tag recorded for `upstreams`, with the bytes it reaches and
    /// its last use (see [`listing`]); pending uses are written to the
    /// index first so a pull just made shows.
    pub async fn cached_tags(&self, upstreams: &[String]) -> io::Result<Vec<listing::CachedTag>> {
        if let Some(life) = &self.life {
            if let Err(e) = life.flush().await {
                tracing::debug!(error = %e, "could not write recent uses to the cache index before listing");
            }
        }
        let index = self.life.as_ref().and_then(|l| l.index());
        let usage = index.as_deref().map_or(listing::Usage::Unknown, listing::Usage::Index);
        listing::cached_tags(self.blobs.as_ref(), self.meta.as_ref(), usage, upstreams).await
    }

    /// Repositories of `upstream` the cache holds tags for, sorted. The
    /// store is walked for them once per upstream, not per request.
    pub async fn repositories(&self, upstream: &str) -> io::Result<Vec<String>> {
        let walked = lock(&self.repositories).get(upstream).is_some_and(|i| i.walked);
        if !walked {
            let found = self.meta.list_repositories(upstream).await?;
            let mut index = lock(&self.repositories);
            let entry = index.entry(upstream.to_string()).or_default();
            entry.names.extend(found);
            entry.walked = true;
        }
        let index = lock(&self.repositories);
        Ok(index
            .get(upstream)
            .map(|i| i.names.iter().cloned().collect())
            .unwrap_or_default())
    }
}

/// Stored content of `size` bytes, read into one buffer.
async fn read_whole(blob: Box<dyn blob_store::StoredBlob>, size: u64) -> io::Result<bytes::Bytes> {
    use futures_util::StreamExt;
    let mut stream = blob.read(0, size);
    let first = stream.next().await.transpose()?.unwrap_or_default();
    if first.len() as u64 == size {
        return Ok(first);
    }
    let mut buf = bytes::BytesMut::with_capacity(size as usize);
    buf.extend_from_slice(&first);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
    }
    Ok(buf.freeze())
}

/// A std mutex whose poisoning (a panic elsewhere while holding it) does
/// not take the cache down: the data behind it stays consistent per call.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
