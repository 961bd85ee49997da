//! The S3 backend: content, tag records and pushed repositories in one
//! bucket every replica shares, through the `object_store` crate.
//!
//! Layout under `cache.prefix` (the disk backend's, so an operator reads
//! both the same way):
//!
//! ```text
//! blobs/<algorithm>/<hex>          content (blobs and manifests alike)
//! blobs/<algorithm>/<hex>.type     media type, for manifests
//! blobs/<algorithm>/<hex>.public   present when the content is public (provenance)
//! meta/<upstream>/<repo>/_tags/<tag>/mt-<type-key>.json  last digest seen for (repo, tag, media type)
//! meta/<upstream>/<repo>/_lists/<query-key>.json         last tags/list answer
//! uploads/<id>                     pushes in progress, copied into place once verified
//! local/<repo>/...                 pushed repositories (see `s3_hosted`)
//! probe/<pid>-<n>                  readiness probes, removed at once
//! ```
//!
//! Content becomes visible under its digest only once verified: a download
//! streams to a multipart upload of its digest's key that is completed after
//! the cache checked the digest (an upload never completed is invisible),
//! and the media type is written before the content, so content seen is
//! content whose type is known. Every object is written whole by one PUT or
//! one completed upload: a reader sees the old record or the new.
//!
//! Nothing here is read at start-up; the bucket is listed only by the
//! operator's commands and the first catalog request.

use std::io;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::blob_store::{BlobInfo, BlobStore, ByteStream, ListedBlob, PendingBlob, StoredBlob};
use super::disk::{not_found_is_none, safe_component, safe_key, type_key, TYPE_KEYED};
use super::meta_store::{MetaStore, RepoKey, TagRecord};
use crate::config::BucketSettings;
use crate::reference::{Digest, RepoName, Tag};

/// Bytes sent per part of a multipart upload: S3's smallest part (5 MiB)
/// with room, since every part but the last must reach it.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one upload sent at the same time; a download waits for the
/// oldest beyond this, so one download holds at most this many parts.
const PARTS_IN_FLIGHT: usize = 2;
/// A request that moves no content (a record, a HEAD) that has not
/// answered by then has failed: a hung bucket must not hold a client.
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest gap between two pieces of a body from the bucket, or the
/// longest a part upload may take: a bucket that stalls mid-transfer fails
/// the transfer (DESIGN rule 16), where a total deadline would cap a layer.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    /// Where this store's keys start (`cache.prefix`), for messages.
    label: String,
    counter: AtomicU64,
}

impl S3Store {
    /// Connects to the bucket (no request is made: the first one shows
    /// whether the settings work, as `/readyz` does).
    pub fn connect(s: &BucketSettings) -> io::Result<Self> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&s.bucket)
            .with_client_options(
                // Content streams for as long as the blob takes; requests
                // without content get SMALL_REQUEST_TIMEOUT in `small`.
                ClientOptions::new()
                    .with_timeout_disabled()
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        if let Some(e) = &s.endpoint {
            b = b
                .with_endpoint(e.as_str().trim_end_matches('/'))
                .with_allow_http(e.scheme() == "http");
        }
        if let Some(r) = &s.region {
            b = b.with_region(r);
        }
        if let Some(path) = &s.credentials_file {
            let (id, secret, token) = read_credentials(path)?;
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = token {
                b = b.with_token(t);
            }
        }
        let store = b
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bucket {}: {e}", s.bucket)))?;
        let store: Arc<dyn ObjectStore> = if s.prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(
                store,
                s.prefix.trim_end_matches('/'),
            ))
        };
        Ok(S3Store {
            store,
            label: format!("s3://{}/{}", s.bucket, s.prefix),
            counter: AtomicU64::new(0),
        })
    }

    /// Where keys start, for the operator's messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn blob_key(d: &Digest) -> Path {
        Path::from_iter(["blobs", d.algorithm().name(), d.hex()])
    }

    fn type_key(d: &Digest) -> Path {
        Path::from_iter(["blobs", d.algorithm().name(), &format!("{}.type", d.hex())])
    }

    pub(super) fn type_key_of(d: &Digest) -> Path {
        Self::type_key(d)
    }

    fn public_key(d: &Digest) -> Path {
        Path::from_iter(["blobs", d.algorithm().name(), &format!("{}.public", d.hex())])
    }

    /// The marker of a digest's last use in the bucket (see `bucket_evict`).
    pub(super) fn used_key(d: &Digest) -> Path {
        Path::from_iter(["used", d.algorithm().name(), d.hex()])
    }

    fn upload_key(id: &str) -> Path {
        Path::from_iter(["uploads", &safe_component(id)])
    }

    fn repo_key(at: RepoKey<'_>) -> Path {
        let mut p = Path::from_iter(["meta", &safe_component(at.upstream)]);
        for c in at.repo.components() {
            p = p.join(c);
        }
        p
    }

    fn tag_dir(at: RepoKey<'_>, tag: &Tag) -> Path {
        Self::repo_key(at).join("_tags").join(tag.as_str())
    }

    // ---- small objects ----

    /// The object at `key`, `None` when there is none.
    pub(super) async fn get_small(&self, key: &Path) -> io::Result<Option<Bytes>> {
        let got = small(async { self.store.get(key).await?.bytes().await }).await;
        not_found_is_none(got).map_err(|e| self.context("read", key, e))
    }

    pub(super) async fn put_small(&self, key: &Path, data: Bytes) -> io::Result<()> {
        small(self.store.put(key, PutPayload::from(data)))
            .await
            .map(|_| ())
            .map_err(|e| self.context("write", key, e))
    }

    /// The object's size and modification time, `None` when there is none.
    pub(super) async fn head(&self, key: &Path) -> io::Result<Option<object_store::ObjectMeta>> {
        not_found_is_none(small(self.store.head(key)).await).map_err(|e| self.context("stat", key, e))
    }

    /// True when something was removed. S3 answers a delete of nothing
    /// with success, so asking is the only way to know.
    pub(super) async fn delete_existing(&self, key: &Path) -> io::Result<bool> {
        if self.head(key).await?.is_none() {
            return Ok(false);
        }
        self.delete_key(key).await?;
        Ok(true)
    }

    pub(super) async fn delete_key(&self, key: &Path) -> io::Result<()> {
        not_found_is_none(small(self.store.delete(key)).await)
            .map(|_| ())
            .map_err(|e| self.context("delete", key, e))
    }

    /// Every object under `prefix`, recursively.
    pub(super) async fn list_all(&self, prefix: &Path) -> io::Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(prefix))
            .map_err(io::Error::from)
            .try_collect()
            .await
            .map_err(|e| self.context("list", prefix, e))
    }

    /// The names of objects and "directories" directly under `prefix`.
    pub(super) async fn list_names(&self, prefix: &Path) -> io::Result<(Vec<String>, Vec<String>)> {
        let listed = small(self.store.list_with_delimiter(Some(prefix)))
            .await
            .map_err(|e| self.context("list", prefix, e))?;
        let name = |p: &Path| p.filename().map(str::to_string);
        Ok((
            listed.objects.iter().filter_map(|o| name(&o.location)).collect(),
            listed.common_prefixes.iter().filter_map(name).collect(),
        ))
    }

    /// Repository names found under `list`, read from keys relative to
    /// `base` up to the first component `is_record` accepts
    /// (`<base>/library/alpine/_tags/...` → `library/alpine`): valid names
    /// only, sorted, each once.
    pub(super) async fn repositories_in(
        &self,
        base: &Path,
        list: &Path,
        is_record: impl Fn(&str) -> bool,
    ) -> io::Result<Vec<RepoName>> {
        let mut out = std::collections::BTreeMap::new();
        for o in self.list_all(list).await? {
            let parts: Vec<String> = o
                .location
                .prefix_match(base)
                .into_iter()
                .flatten()
                .map(|p| p.as_ref().to_string())
                .collect();
            if let Some(i) = parts.iter().position(|p| is_record(p)) {
                if let Ok(r) = RepoName::parse(&parts[..i].join("/")) {
                    out.insert(r.as_str().to_string(), r);
                }
            }
        }
        Ok(out.into_values().collect())
    }

    fn context(&self, what: &str, key: &Path, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{what} {}{key}: {e}", self.label))
    }

    // ---- content ----

    pub async fn stat_blob(&self, d: &Digest) -> io::Result<Option<BlobInfo>> {
        let (content_key, type_key, public_key) = (Self::blob_key(d), Self::type_key(d), Self::public_key(d));
        let (content, media_type, public) = tokio::try_join!(
            self.head(&content_key),
            self.get_small(&type_key),
            self.head(&public_key),
        )?;
        Ok(content.map(|meta| BlobInfo {
            size: meta.size,
            media_type: media_type.map(|t| String::from_utf8_lossy(&t).into_owned()),
            public: public.is_some(),
        }))
    }

    /// Opens content for reading: the whole object is asked for at once,
    /// so what is opened stays readable if it is deleted meanwhile (the
    /// store keeps serving a read it began).
    pub async fn open_blob(&self, d: &Digest) -> io::Result<Option<BucketBlob>> {
        let key = Self::blob_key(d);
        let get = async {
            match small(self.store.get(&key)).await {
                Ok(r) => Ok(Some(r)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.context("read", &key, e)),
            }
        };
        let (type_key, public_key) = (Self::type_key(d), Self::public_key(d));
        let (got, media_type, public) = tokio::try_join!(get, self.get_small(&type_key), self.head(&public_key))?;
        let Some(got) = got else { return Ok(None) };
        Ok(Some(BucketBlob {
            info: BlobInfo {
                size: got.meta.size,
                media_type: media_type.map(|t| String::from_utf8_lossy(&t).into_owned()),
                public: public.is_some(),
            },
            whole: Some(got.into_stream()),
            store: self.store.clone(),
            key,
        }))
    }

    /// Starts writing content whose digest is known (a download): it lands
    /// under that digest's key when committed.
    pub fn begin_blob(&self, d: &Digest) -> BucketUpload {
        BucketUpload::new(self.store.clone(), Self::blob_key(d), None)
    }

    /// Starts writing a push whose digest comes last: parts go to a key of
    /// its own, copied under the digest's once verified.
    pub fn begin_push(&self, id: &str) -> BucketUpload {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let temp = Self::upload_key(&format!("{id}.{}.{n}", std::process::id()));
        BucketUpload::new(self.store.clone(), temp.clone(), Some(temp))
    }

    pub async fn delete_blob(&self, d: &Digest) -> io::Result<()> {
        // Content first: a digest is gone once its content is.
        self.delete_key(&Self::blob_key(d)).await?;
        self.delete_key(&Self::type_key(d)).await?;
        self.delete_key(&Self::public_key(d)).await?;
        self.delete_key(&Self::used_key(d)).await
    }

    pub async fn set_media_type(&self, d: &Digest, media_type: &str) -> io::Result<()> {
        self.put_small(&Self::type_key(d), Bytes::copy_from_slice(media_type.as_bytes()))
            .await
    }

    pub async fn mark_public(&self, d: &Digest) -> io::Result<()> {
        self.put_small(&Self::public_key(d), Bytes::new()).await
    }

    /// Everything stored: one listing of `blobs/`, for the operator's
    /// commands.
    pub async fn list_blobs(&self) -> io::Result<Vec<ListedBlob>> {
        let listed = self.list_all(&Path::from("blobs")).await?;
        let typed: std::collections::HashSet<String> = listed
            .iter()
            .filter_map(|o| o.location.filename())
            .filter_map(|n| n.strip_suffix(".type"))
            .map(str::to_string)
            .collect();
        let mut out = Vec::new();
        for o in &listed {
            let parts: Vec<_> = o.location.parts().collect();
            let [_, algo, name] = parts.as_slice() else { continue };
            let Ok(digest) = Digest::parse(&format!("{}:{}", algo.as_ref(), name.as_ref())) else {
                continue;
            };
            out.push(ListedBlob {
                manifest: typed.contains(name.as_ref()),
                size: o.size,
                modified_ms: o.last_modified.timestamp_millis().max(0) as u64,
                digest,
            });
        }
        Ok(out)
    }

    /// Moves content that failed its digest out of `blobs/` (copied under
    /// `quarantine/`, for a look, then deleted); the key it was copied to.
    pub async fn quarantine(&self, d: &Digest, now_ms: u64) -> io::Result<String> {
        let to = Path::from_iter(["quarantine", &format!("{}-{now_ms}", d.hex())]);
        self.store
            .copy(&Self::blob_key(d), &to)
            .await
            .map_err(|e| self.context("quarantine", &Self::blob_key(d), e.into()))?;
        self.delete_blob(d).await?;
        Ok(format!("{}{to}", self.label))
    }

    /// Writes and removes a probe: the bucket answers and takes writes.
    pub async fn check_writable(&self) -> io::Result<()> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let key = Path::from_iter(["probe", &format!("{}-{n}", std::process::id())]);
        self.put_small(&key, Bytes::from_static(b"ready")).await?;
        self.delete_key(&key).await
    }
}

/// The bucket alone, for the operator's commands (listing, verifying,
/// evicting, removing): reads and deletes. Writes go through a replica's
/// local read cache ([`super::tiered::TieredStore`]), which its readers
/// follow while a download runs, so they are refused here.
#[async_trait]
impl BlobStore for S3Store {
    async fn stat(&self, d: &Digest) -> io::Result<Option<BlobInfo>> {
        self.stat_blob(d).await
    }

    async fn open(&self, d: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>> {
        Ok(self.open_blob(d).await?.map(|b| Box::new(b) as Box<dyn StoredBlob>))
    }

    async fn begin(&self, _d: &Digest) -> io::Result<Box<dyn PendingBlob>> {
        Err(writes_need_a_read_cache())
    }

    async fn begin_upload(&self, _id: &str) -> io::Result<Box<dyn PendingBlob>> {
        Err(writes_need_a_read_cache())
    }

    async fn delete(&self, d: &Digest) -> io::Result<()> {
        self.delete_blob(d).await
    }

    async fn set_media_type(&self, d: &Digest, media_type: &str) -> io::Result<()> {
        S3Store::set_media_type(self, d, media_type).await
    }

    async fn mark_public(&self, d: &Digest) -> io::Result<()> {
        S3Store::mark_public(self, d).await
    }

    async fn list(&self) -> io::Result<Vec<ListedBlob>> {
        self.list_blobs().await
    }

    async fn check_writable(&self) -> io::Result<()> {
        S3Store::check_writable(self).await
    }
}

fn writes_need_a_read_cache() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "the S3 backend writes through a replica's local read cache",
    )
}

/// Content opened in the bucket.
pub struct BucketBlob {
    info: BlobInfo,
    /// The whole object, asked for at open.
    whole: Option<futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>>,
    store: Arc<dyn ObjectStore>,
    key: Path,
}

impl BucketBlob {
    pub fn info(&self) -> &BlobInfo {
        &self.info
    }
}

impl StoredBlob for BucketBlob {
    fn info(&self) -> &BlobInfo {
        &self.info
    }

    fn read(mut self: Box<Self>, start: u64, end: u64) -> ByteStream {
        if start >= end {
            return Box::pin(futures_util::stream::empty());
        }
        let size = self.info.size;
        let whole = self.whole.take();
        let stream: futures_util::stream::BoxStream<'static, io::Result<Bytes>> = match whole {
            Some(s) if start == 0 && end == size => s.map_err(io::Error::from).boxed(),
            Some(s) if start == 0 => take_bytes(s.map_err(io::Error::from).boxed(), end).boxed(),
            _ => {
                drop(whole);
                let (store, key) = (self.store, self.key);
                futures_util::stream::once(async move {
                    let opts = object_store::GetOptions::new().with_range(Some(start..end));
                    small(store.get_opts(&key, opts)).await
                })
                .map_ok(|r| r.into_stream().map_err(io::Error::from))
                .try_flatten()
                .boxed()
            }
        };
        Box::pin(checked_length(no_stall(stream), end - start))
    }
}

/// `s`, failing when the next piece takes longer than [`STALL_TIMEOUT`].
fn no_stall(
    s: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
    futures_util::stream::unfold(Some(s), |s| async move {
        let mut s = s?;
        match tokio::time::timeout(STALL_TIMEOUT, s.next()).await {
            Ok(None) => None,
            Ok(Some(item)) => Some((item, Some(s))),
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the bucket sent nothing for {STALL_TIMEOUT:?}"),
                )),
                None,
            )),
        }
    })
    .boxed()
}

/// The first `n` bytes of `s`.
fn take_bytes(
    s: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    n: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::try_unfold((s, n), |(mut s, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        match s.next().await.transpose()? {
            None => Ok(None),
            Some(mut chunk) => {
                if chunk.len() as u64 > left {
                    chunk.truncate(left as usize);
                }
                let left = left - chunk.len() as u64;
                Ok(Some((chunk, (s, left))))
            }
        }
    })
}

/// Fails a stream that ends before `expected` bytes, as the disk backend
/// does: a cut connection to the bucket must never look like a short blob.
fn checked_length(
    s: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    expected: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::try_unfold((s, 0u64), move |(mut s, seen)| async move {
        match s.next().await.transpose()? {
            Some(chunk) => {
                let seen = seen + chunk.len() as u64;
                Ok(Some((chunk, (s, seen))))
            }
            None if seen < expected => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the bucket ended the content after {seen} of {expected} bytes"),
            )),
            None => Ok(None),
        }
    })
}

/// Content on its way into the bucket: parts of a multipart upload, sent
/// as they fill, completed only by `commit`. A blob smaller than one part
/// is sent whole by one PUT at commit.
pub struct BucketUpload {
    store: Arc<dyn ObjectStore>,
    key: Path,
    /// For a push: the temporary key, removed once copied into place.
    temp: Option<Path>,
    buf: BytesMut,
    upload: Option<Box<dyn MultipartUpload>>,
    parts: std::collections::VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    finished: bool,
}

impl BucketUpload {
    fn new(store: Arc<dyn ObjectStore>, key: Path, temp: Option<Path>) -> Self {
        BucketUpload {
            store,
            key,
            temp,
            buf: BytesMut::new(),
            upload: None,
            parts: Default::default(),
            finished: false,
        }
    }

    pub async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.buf.extend_from_slice(&data);
        while self.buf.len() >= PART_SIZE {
            let part = self.buf.split_to(PART_SIZE).freeze();
            self.send_part(part).await?;
        }
        Ok(())
    }

    async fn send_part(&mut self, part: Bytes) -> io::Result<()> {
        if self.upload.is_none() {
            let up = self
                .store
                .put_multipart(&self.key)
                .await
                .map_err(|e| io::Error::other(format!("start the upload of {}: {e}", self.key)))?;
            self.upload = Some(up);
        }
        let Some(up) = self.upload.as_mut() else {
            return Err(io::Error::other("upload not started"));
        };
        let sending = up.put_part(PutPayload::from(part));
        self.parts.push_back(tokio::spawn(sending));
        while self.parts.len() > PARTS_IN_FLIGHT {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self) -> io::Result<()> {
        if let Some(h) = self.parts.pop_front() {
            tokio::time::timeout(STALL_TIMEOUT, h)
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("a part of {} took over {STALL_TIMEOUT:?}", self.key),
                    )
                })?
                .map_err(io::Error::other)?
                .map_err(|e| io::Error::other(format!("upload a part of {}: {e}", self.key)))?;
        }
        Ok(())
    }

    async fn put_type(store: &Arc<dyn ObjectStore>, k: &Path, media_type: &str) -> io::Result<()> {
        let body = PutPayload::from(Bytes::copy_from_slice(media_type.as_bytes()));
        small(store.put(k, body))
            .await
            .map(|_| ())
            .map_err(|e| io::Error::other(format!("write {k}: {e}")))
    }

    /// Makes what was written the object at its key; `media_type` is
    /// written first, so content seen is content whose type is known.
    pub async fn commit(&mut self, media_type: Option<&str>, type_key: Option<Path>) -> io::Result<()> {
        if let (Some(t), Some(k)) = (media_type, type_key) {
            Self::put_type(&self.store, &k, t).await?;
        }
        let rest = self.buf.split().freeze();
        if self.upload.is_none() {
            self.store
                .put(&self.key, PutPayload::from(rest))
                .await
                .map_err(|e| io::Error::other(format!("write {}: {e}", self.key)))?;
        } else {
            if !rest.is_empty() {
                self.send_part(rest).await?;
            }
            while !self.parts.is_empty() {
                self.wait_oldest().await?;
            }
            if let Some(up) = self.upload.as_mut() {
                up.complete()
                    .await
                    .map_err(|e| io::Error::other(format!("complete the upload of {}: {e}", self.key)))?;
            }
            self.upload = None;
        }
        self.finished = true;
        Ok(())
    }

    /// For a push: commits to the temporary key, then copies it under
    /// `d`'s (written by the caller, who verified the bytes).
    pub async fn commit_to(&mut self, d: &Digest, media_type: Option<&str>) -> io::Result<()> {
        self.commit(None, None).await?;
        if let Some(t) = media_type {
            Self::put_type(&self.store, &S3Store::type_key(d), t).await?;
        }
        let dest = S3Store::blob_key(d);
        self.store
            .copy(&self.key, &dest)
            .await
            .map_err(|e| io::Error::other(format!("copy {} to {dest}: {e}", self.key)))?;
        if let Some(temp) = self.temp.take() {
            if let Err(e) = self.store.delete(&temp).await {
                tracing::warn!(key = %temp, error = %e, "could not remove a finished upload's parts");
            }
        }
        Ok(())
    }

    pub async fn abort(&mut self) {
        self.finished = true;
        for h in self.parts.drain(..) {
            h.abort();
        }
        if let Some(mut up) = self.upload.take() {
            if let Err(e) = up.abort().await {
                tracing::warn!(key = %self.key, error = %e, "could not abort an upload; the bucket keeps its parts until its lifecycle rule removes them");
            }
        }
        if let Some(temp) = self.temp.take() {
            let _ = self.store.delete(&temp).await;
        }
    }
}

impl Drop for BucketUpload {
    /// A task that died mid-write: its upload is aborted in the
    /// background, never completed.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for h in self.parts.drain(..) {
            h.abort();
        }
        let (upload, temp, store) = (self.upload.take(), self.temp.take(), self.store.clone());
        if upload.is_none() && temp.is_none() {
            return;
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Some(mut up) = upload {
                    let _ = up.abort().await;
                }
                if let Some(t) = temp {
                    let _ = store.delete(&t).await;
                }
            });
        }
    }
}

/// Runs a request that moves no content under [`SMALL_REQUEST_TIMEOUT`].
async fn small<T>(f: impl std::future::Future<Output = object_store::Result<T>>) -> io::Result<T> {
    match tokio::time::timeout(SMALL_REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(io::Error::from),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the bucket did not answer within {SMALL_REQUEST_TIMEOUT:?}"),
        )),
    }
}

/// Reads `aws_access_key_id`, `aws_secret_access_key` and
/// `aws_session_token` from the `[default]` profile (or `AWS_PROFILE`'s)
/// of an AWS shared-credentials file.
fn read_credentials(path: &FsPath) -> io::Result<(String, String, Option<String>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cache.credentials_file {}: {e}", path.display())))?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            in_profile = name == profile || name == format!("profile {profile}");
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = Some(v.trim().to_string());
            match k.trim() {
                "aws_access_key_id" => id = v,
                "aws_secret_access_key" => secret = v,
                "aws_session_token" => token = v,
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok((id, secret, token)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cache.credentials_file {}: profile [{profile}] needs aws_access_key_id and aws_secret_access_key",
                path.display()
            ),
        )),
    }
}

#[async_trait]
impl MetaStore for S3Store {
    async fn put_tag(&self, at: RepoKey<'_>, tag: &Tag, rec: &TagRecord) -> io::Result<()> {
        let data = serde_json::to_vec(rec).map_err(io::Error::other)?;
        let key = Self::tag_dir(at, tag).join(format!("{TYPE_KEYED}{}.json", type_key(&rec.media_type)));
        self.put_small(&key, Bytes::from(data)).await
    }

    async fn get_tags(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<Vec<TagRecord>> {
        let dir = Self::tag_dir(at, tag);
        let (names, _) = self.list_names(&dir).await?;
        let reads = names
            .iter()
            .filter(|n| n.starts_with(TYPE_KEYED) && n.ends_with(".json"))
            .map(|n| {
                let key = dir.clone().join(n.as_str());
                async move { self.get_small(&key).await }
            });
        let mut out = Vec::new();
        for data in futures_util::future::try_join_all(reads).await?.into_iter().flatten() {
            // A record that does not parse is skipped, never served.
            if let Ok(rec) = serde_json::from_slice::<TagRecord>(&data) {
                if !rec.media_type.is_empty() {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    async fn list_tags(&self, at: RepoKey<'_>) -> io::Result<Vec<Tag>> {
        let (_, dirs) = self.list_names(&Self::repo_key(at).join("_tags")).await?;
        let mut out: Vec<Tag> = dirs.iter().filter_map(|n| Tag::parse(n).ok()).collect();
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }

    async fn delete_tag(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<()> {
        for o in self.list_all(&Self::tag_dir(at, tag)).await? {
            self.delete_key(&o.location).await?;
        }
        Ok(())
    }

    async fn put_tag_list(&self, at: RepoKey<'_>, key: &str, body: &[u8]) -> io::Result<()> {
        let k = Self::repo_key(at)
            .join("_lists")
            .join(format!("{}.json", safe_key(key)));
        self.put_small(&k, Bytes::copy_from_slice(body)).await
    }

    async fn get_tag_list(&self, at: RepoKey<'_>, key: &str) -> io::Result<Option<Vec<u8>>> {
        let k = Self::repo_key(at)
            .join("_lists")
            .join(format!("{}.json", safe_key(key)));
        Ok(self.get_small(&k).await?.map(|b| b.to_vec()))
    }

    async fn list_repositories(&self, upstream: &str) -> io::Result<Vec<String>> {
        let base = Path::from_iter(["meta", &safe_component(upstream)]);
        let repos = self.repositories_in(&base, &base, |p| p == "_tags").await?;
        Ok(repos.iter().map(|r| r.as_str().to_string()).collect())
    }
}
