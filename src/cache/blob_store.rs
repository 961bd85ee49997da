//! The interface every content backend offers: verified, content-addressed
//! bytes keyed by digest, shared by every upstream and repository.
//!
//! No file paths cross this interface, so a backend may keep content on a
//! local disk or in an object store. Writes go through a [`PendingBlob`]
//! that is either committed (after the cache verified the digest) or
//! aborted; nothing half-written is ever visible under a digest. While a
//! pending blob grows, readers follow it through a [`GrowingBlob`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

use crate::reference::Digest;

/// Bytes as they leave a backend: chunks, with an error ending the stream.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    /// The media type upstream served a manifest with; `None` for layers
    /// and configs, and for manifest bytes fetched as blobs.
    pub media_type: Option<String>,
    /// Provenance: fetched (or since proven readable) without any client's
    /// credential, so it may be served to anyone allowed to use the proxy.
    pub public: bool,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    async fn stat(&self, d: &Digest) -> io::Result<Option<BlobInfo>>;
    /// Opens stored content for reading. What is opened stays readable
    /// while it is streamed, even if it is deleted meanwhile.
    async fn open(&self, d: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>>;
    /// Starts writing content that is not stored yet.
    async fn begin(&self, d: &Digest) -> io::Result<Box<dyn PendingBlob>>;
    /// Starts writing content another replica is storing in the store the
    /// replicas share: a backend with a local tier writes only that. The
    /// same as [`BlobStore::begin`] for a backend that shares nothing.
    async fn begin_unshared(&self, d: &Digest) -> io::Result<Box<dyn PendingBlob>> {
        self.begin(d).await
    }
    /// Starts writing a push whose digest the client names only at the
    /// end: it becomes visible with [`PendingBlob::commit_to`]. `id` is the
    /// upload session's, for finding strays.
    async fn begin_upload(&self, id: &str) -> io::Result<Box<dyn PendingBlob>>;
    async fn delete(&self, d: &Digest) -> io::Result<()>;
    /// Records the media type of content first stored without one (manifest
    /// bytes fetched through the blobs URL), once upstream has named it.
    async fn set_media_type(&self, d: &Digest, media_type: &str) -> io::Result<()>;
    /// Records that the content is public (see [`BlobInfo::public`]).
    async fn mark_public(&self, d: &Digest) -> io::Result<()>;
    /// Everything stored, for the operator's commands and for indexing a
    /// store that predates the recency index. Walks the store: never on a
    /// request's path.
    async fn list(&self) -> io::Result<Vec<ListedBlob>>;
    /// Whether new content can be written now (`/readyz`): writes and
    /// removes a small probe where downloads go.
    async fn check_writable(&self) -> io::Result<()>;
}

/// One stored digest as [`BlobStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlob {
    pub digest: Digest,
    pub size: u64,
    /// Stored with a media type (a manifest).
    pub manifest: bool,
    /// Last modification, ms since the Unix epoch.
    pub modified_ms: u64,
}

/// Stored content, opened.
pub trait StoredBlob: Send {
    fn info(&self) -> &BlobInfo;
    /// The bytes `[start, end)` as a stream (a ranged read).
    fn read(self: Box<Self>, start: u64, end: u64) -> ByteStream;
}

/// Content being written. Dropped without `commit` or `abort` (a task that
/// died), it is aborted: nothing is left behind.
#[async_trait]
pub trait PendingBlob: Send {
    /// Appends `data`; once this returns, followers can read it. Owned, so
    /// a backend can hand it to another thread (or a request) uncopied.
    async fn write(&mut self, data: Bytes) -> io::Result<()>;
    /// Claims room for `len` bytes before any is written, so that a full
    /// disk shows here (the download then streams uncached) rather than
    /// half-way through. Backends without the notion accept anything.
    async fn reserve(&mut self, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// A reader of what has been written so far, valid after commit too.
    fn follower(&self) -> Arc<dyn GrowingBlob>;
    /// Makes the content durable and visible under its digest.
    async fn commit(self: Box<Self>, media_type: Option<&str>) -> io::Result<()>;
    /// Makes an upload durable and visible under `d`, which the caller
    /// has verified against the bytes written.
    async fn commit_to(self: Box<Self>, d: &Digest, media_type: Option<&str>) -> io::Result<()>;
    /// Bytes written so far.
    fn written(&self) -> u64;
    async fn abort(self: Box<Self>);
}

/// Reads a pending blob while it is written: the caller knows how much has
/// been written (the cache publishes it) and never reads past that.
#[async_trait]
pub trait GrowingBlob: Send + Sync {
    /// Up to `max` bytes at `pos`; empty only at the end of what is written.
    async fn read_at(&self, pos: u64, max: usize) -> io::Result<Bytes>;
}
