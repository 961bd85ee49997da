//! The S3 backend's content: the bucket every replica shares, behind this
//! replica's bounded local read cache (a [`DiskStore`] in `cache.dir`,
//! kept under `cache.max_size` by the evictor).
//!
//! A download is written to both at once: readers follow the local copy
//! while parts stream to the bucket, and the bucket's copy is completed
//! (made visible to every replica) before the local one. Content read from
//! the bucket is copied into the local cache as it is served, and committed
//! there once all of it arrived and its digest checks (every byte
//! committed to a store is verified, whatever it came from), so the next
//! read is a local one. The client never waits for that copy: when the
//! local disk falls behind, the copy is given up and made again from the
//! bucket after the client has all of it. The local cache is not synced to
//! disk: after a crash it is emptied instead ([`DiskStore::open_read_cache`]).
//! Evicting from the local cache never touches the bucket; deleting does.

use std::io;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::blob_store::{BlobInfo, BlobStore, ByteStream, GrowingBlob, ListedBlob, PendingBlob, StoredBlob};
use super::disk::DiskStore;
use super::evict::Lifecycle;
use super::index::Class;
use super::s3::{BucketBlob, BucketUpload, S3Store};
use crate::reference::Digest;

/// Chunks a copy into the local cache may lag behind the client it is
/// served to (each up to [`CHUNK`]); beyond that the copy is given up and
/// made after the client was served (the bucket holds the content: unlike
/// a download, nothing is lost by not waiting for the local disk).
const COPY_BACKLOG: usize = 16;
/// Bytes handed on at once when reading from the bucket: the bucket's body
/// arrives in pieces of a few KiB, each of which would otherwise cost a
/// write to the client and one to the local copy.
const CHUNK: usize = 256 * 1024;

pub struct TieredStore {
    local: Arc<DiskStore>,
    bucket: Arc<S3Store>,
    copies: Arc<Copies>,
}

impl TieredStore {
    pub fn new(local: Arc<DiskStore>, bucket: Arc<S3Store>) -> Self {
        let copies = Arc::new(Copies {
            local: local.clone(),
            bucket: bucket.clone(),
            life: OnceLock::new(),
            slots: tokio::sync::Semaphore::new(LATER_COPIES),
            pending: Default::default(),
        });
        TieredStore { local, bucket, copies }
    }

    pub fn set_lifecycle(&self, life: Arc<Lifecycle>) {
        let _ = self.copies.life.set(life);
    }

    /// At shutdown: the local read cache is kept for the next start.
    pub fn close(&self) -> io::Result<()> {
        self.local.mark_clean()
    }
}

#[async_trait]
impl BlobStore for TieredStore {
    async fn stat(&self, d: &Digest) -> io::Result<Option<BlobInfo>> {
        if let Some(info) = self.local.stat(d).await? {
            return Ok(Some(info));
        }
        self.bucket.stat_blob(d).await
    }

    async fn open(&self, d: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>> {
        if let Some(local) = self.local.open(d).await? {
            return Ok(Some(local));
        }
        let Some(blob) = self.bucket.open_blob(d).await? else {
            return Ok(None);
        };
        Ok(Some(Box::new(CopiedBlob {
            blob,
            digest: d.clone(),
            copies: self.copies.clone(),
        })))
    }

    async fn begin(&self, d: &Digest) -> io::Result<Box<dyn PendingBlob>> {
        let local = self.local.begin(d).await?;
        Ok(Box::new(TieredPending {
            local,
            bucket: self.bucket.begin_blob(d),
            digest: Some(d.clone()),
        }))
    }

    async fn begin_unshared(&self, d: &Digest) -> io::Result<Box<dyn PendingBlob>> {
        self.local.begin(d).await
    }

    async fn begin_upload(&self, id: &str) -> io::Result<Box<dyn PendingBlob>> {
        let local = self.local.begin_upload(id).await?;
        Ok(Box::new(TieredPending {
            local,
            bucket: self.bucket.begin_push(id),
            digest: None,
        }))
    }

    async fn delete(&self, d: &Digest) -> io::Result<()> {
        self.bucket.delete_blob(d).await?;
        self.local.delete(d).await
    }

    async fn set_media_type(&self, d: &Digest, media_type: &str) -> io::Result<()> {
        self.bucket.set_media_type(d, media_type).await?;
        if self.local.stat(d).await?.is_some() {
            self.local.set_media_type(d, media_type).await?;
        }
        Ok(())
    }

    async fn mark_public(&self, d: &Digest) -> io::Result<()> {
        self.bucket.mark_public(d).await?;
        if self.local.stat(d).await?.is_some() {
            self.local.mark_public(d).await?;
        }
        Ok(())
    }

    async fn list(&self) -> io::Result<Vec<ListedBlob>> {
        self.bucket.list_blobs().await
    }

    async fn check_writable(&self) -> io::Result<()> {
        self.local.check_writable().await?;
        self.bucket.check_writable().await
    }
}

/// A download or push written to the local cache and the bucket at once.
struct TieredPending {
    local: Box<dyn PendingBlob>,
    bucket: BucketUpload,
    digest: Option<Digest>,
}

#[async_trait]
impl PendingBlob for TieredPending {
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.local.write(data.clone()).await?;
        self.bucket.write(data).await
    }

    async fn reserve(&mut self, len: u64) -> io::Result<()> {
        self.local.reserve(len).await
    }

    fn follower(&self) -> Arc<dyn GrowingBlob> {
        self.local.follower()
    }

    async fn commit(mut self: Box<Self>, media_type: Option<&str>) -> io::Result<()> {
        let d = self
            .digest
            .clone()
            .ok_or_else(|| io::Error::other("an upload commits with commit_to"))?;
        let type_key = media_type.map(|_| S3Store::type_key_of(&d));
        self.bucket.commit(media_type, type_key).await?;
        let TieredPending { local, .. } = *self;
        if let Err(e) = local.commit(media_type).await {
            // The bucket holds it: served from there until copied again.
            tracing::warn!(digest = %d, error = %e, "stored in the bucket but not in the local read cache");
        }
        Ok(())
    }

    async fn commit_to(mut self: Box<Self>, d: &Digest, media_type: Option<&str>) -> io::Result<()> {
        self.bucket.commit_to(d, media_type).await?;
        let TieredPending { local, .. } = *self;
        if let Err(e) = local.commit_to(d, media_type).await {
            tracing::warn!(digest = %d, error = %e, "stored in the bucket but not in the local read cache");
        }
        Ok(())
    }

    fn written(&self) -> u64 {
        self.local.written()
    }

    async fn abort(mut self: Box<Self>) {
        self.bucket.abort().await;
        let TieredPending { local, .. } = *self;
        local.abort().await;
    }
}

/// Content served from the bucket, copied into the local cache on the way
/// when it is read whole.
struct CopiedBlob {
    blob: BucketBlob,
    digest: Digest,
    copies: Arc<Copies>,
}

impl StoredBlob for CopiedBlob {
    fn info(&self) -> &BlobInfo {
        self.blob.info()
    }

    fn read(self: Box<Self>, start: u64, end: u64) -> ByteStream {
        let info = self.blob.info().clone();
        let size = info.size;
        let whole = start == 0 && end == size;
        let stream = coalesce(Box::new(self.blob).read(start, end), CHUNK);
        if !whole {
            return Box::pin(stream);
        }
        let copies = self.copies.clone();
        let (tx, _) = copies.start_copy(&self.digest, info);
        // Each chunk goes to the copy before the client, unless the copy
        // fell [`COPY_BACKLOG`] chunks behind: then it is given up, never
        // waited for, and made again from the bucket once this client has
        // all of it (`Later`).
        let later = Later {
            copies,
            digest: self.digest,
            wanted: false,
            left: size,
        };
        Box::pin(futures_util::stream::unfold(
            (Box::pin(stream), Some(tx), later),
            |(mut s, mut tx, mut later)| async move {
                let item = s.next().await?;
                match &item {
                    Ok(chunk) => {
                        later.left = later.left.saturating_sub(chunk.len() as u64);
                        if let Some(t) = &tx {
                            match t.try_send(chunk.clone()) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(_)) => {
                                    tx = None;
                                    later.wanted = true;
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => tx = None,
                            }
                        }
                    }
                    Err(_) => tx = None,
                }
                Some((item, (s, tx, later)))
            },
        ))
    }
}

/// What copies from the bucket into the local cache need: the two stores,
/// the local cache's bound keeper, and the copies made after a client was
/// served (one digest once, [`LATER_COPIES`] at a time).
struct Copies {
    local: Arc<DiskStore>,
    bucket: Arc<S3Store>,
    /// The local cache's bound keeper, told of each copy made from the
    /// bucket (the fetch path tells it of downloads itself).
    life: OnceLock<Arc<Lifecycle>>,
    slots: tokio::sync::Semaphore,
    pending: std::sync::Mutex<std::collections::HashSet<Digest>>,
}

impl Copies {
    /// A copy of `d` into the local cache, fed through the returned sender
    /// (at most [`COPY_BACKLOG`] chunks ahead of the disk).
    fn start_copy(&self, d: &Digest, info: BlobInfo) -> (mpsc::Sender<Bytes>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Bytes>(COPY_BACKLOG);
        let copy = tokio::spawn(copy_to_local(
            rx,
            self.local.clone(),
            d.clone(),
            info,
            self.life.get().cloned(),
        ));
        (tx, copy)
    }
}

/// Copies made after their client was served that may run at once: each is
/// a whole read from the bucket and a write to the local disk.
const LATER_COPIES: usize = 2;

/// Dropped with the client's stream: when its copy was given up and the
/// client was handed all of it (the server drops a body once its length
/// is sent, without asking for its end), the content is copied again from
/// the bucket.
struct Later {
    copies: Arc<Copies>,
    digest: Digest,
    wanted: bool,
    /// Bytes not yet handed to the client.
    left: u64,
}

impl Drop for Later {
    fn drop(&mut self) {
        if !self.wanted || self.left > 0 {
            return;
        }
        let fresh = self
            .copies
            .pending
            .lock()
            .is_ok_and(|mut p| p.insert(self.digest.clone()));
        if !fresh {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(copy_later(self.copies.clone(), self.digest.clone()));
        }
    }
}

/// The copy a client's read gave up on, made once no client waits for it:
/// read whole from the bucket (unless a copy arrived meanwhile) and
/// written to the local cache at the disk's pace.
async fn copy_later(copies: Arc<Copies>, d: Digest) {
    if let Ok(_slot) = copies.slots.acquire().await {
        if let Err(e) = copy_now(&copies, &d).await {
            tracing::debug!(digest = %d, error = %e, "no local copy of bucket content");
        }
    }
    if let Ok(mut p) = copies.pending.lock() {
        p.remove(&d);
    }
}

async fn copy_now(copies: &Arc<Copies>, d: &Digest) -> io::Result<()> {
    if copies.local.stat(d).await?.is_some() {
        return Ok(());
    }
    let Some(blob) = copies.bucket.open_blob(d).await? else {
        return Ok(());
    };
    let info = blob.info().clone();
    let (tx, copy) = copies.start_copy(d, info.clone());
    let mut body = Box::pin(coalesce(Box::new(blob).read(0, info.size), CHUNK));
    while let Some(chunk) = body.next().await {
        if tx.send(chunk?).await.is_err() {
            break;
        }
    }
    drop(tx);
    copy.await.map_err(io::Error::other)
}

/// `s` in pieces of at least `size` bytes (the last may be shorter).
fn coalesce(s: ByteStream, size: usize) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold((s, false), move |(mut s, done)| async move {
        if done {
            return None;
        }
        let mut buf = bytes::BytesMut::new();
        loop {
            match s.next().await {
                Some(Ok(chunk)) => {
                    if buf.is_empty() && chunk.len() >= size {
                        return Some((Ok(chunk), (s, false)));
                    }
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= size {
                        return Some((Ok(buf.freeze()), (s, false)));
                    }
                }
                Some(Err(e)) => {
                    if buf.is_empty() {
                        return Some((Err(e), (s, true)));
                    }
                    // What arrived is handed on; the error ends the stream
                    // on the next poll, as it would have.
                    return Some((
                        Ok(buf.freeze()),
                        (futures_util::stream::once(async { Err(e) }).boxed(), false),
                    ));
                }
                None if buf.is_empty() => return None,
                None => return Some((Ok(buf.freeze()), (s, true))),
            }
        }
    })
}

/// Writes what `rx` brings to the local cache and commits it once it is
/// all there and its digest checks; anything less leaves nothing behind.
async fn copy_to_local(
    mut rx: mpsc::Receiver<Bytes>,
    local: Arc<DiskStore>,
    d: Digest,
    info: BlobInfo,
    life: Option<Arc<Lifecycle>>,
) {
    let mut pending = match local.begin(&d).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(digest = %d, error = %e, "no local copy of bucket content");
            return;
        }
    };
    let mut hasher = d.hasher();
    while let Some(chunk) = rx.recv().await {
        hasher.update(&chunk);
        if let Err(e) = pending.write(chunk).await {
            tracing::debug!(digest = %d, error = %e, "no local copy of bucket content");
            pending.abort().await;
            return;
        }
    }
    // The sender is dropped both at the end and when the client went away
    // or the bucket's stream broke: only the length tells them apart.
    if pending.written() != info.size {
        pending.abort().await;
        return;
    }
    let got = hasher.finish();
    if got != d {
        crate::metrics::METRICS.digest_mismatches.inc();
        tracing::warn!(digest = %d, %got, "bucket content does not match its digest; not copied (regmirror cache verify checks the bucket)");
        pending.abort().await;
        return;
    }
    // Provenance first: the copy is served as soon as it is committed, and
    // public content must not be seen as private meanwhile. The mark is the
    // bucket's word on the digest, true with or without this copy.
    if info.public {
        if let Err(e) = local.mark_public(&d).await {
            tracing::debug!(digest = %d, error = %e, "no local copy: its provenance could not be written");
            pending.abort().await;
            return;
        }
    }
    if let Err(e) = pending.commit(info.media_type.as_deref()).await {
        tracing::debug!(digest = %d, error = %e, "no local copy of bucket content");
        return;
    }
    if let Some(life) = life {
        let class = if info.media_type.is_some() {
            Class::Manifest
        } else {
            Class::Layer
        };
        life.added(&d, info.size, class);
    }
}
