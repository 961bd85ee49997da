//! The content cache: verified, content-addressed bytes (`blob_store`),
//! what upstream last said of tags (`meta_store`), their local-directory
//! backend (`local`), the single-flight fetch that fills the cache
//! (`fetch`) and the streams that serve from it (`served`).
//!
//! The cache never sees a URL: callers hand it a digest and a function that
//! opens a byte stream, and it calls that function at most once per cold
//! digest however many clients ask at the same time. Handlers reach the
//! stores only through [`Cache`]'s methods, and never name a backend.

pub mod blob_store;
pub mod error;
pub mod fetch;
pub mod local;
pub mod meta_store;
pub mod served;
#[cfg(test)]
mod store_suite;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use blob_store::{BlobInfo, BlobStore, ByteStream};
pub use error::FetchError;
pub use fetch::{OpenFuture, Source};
pub use local::LocalStore;
pub use meta_store::{MetaStore, RepoKey, TagRecord};
pub use served::{Served, ServedInfo};

use crate::reference::{Digest, Tag};

pub struct Cache {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    inflight: Mutex<HashMap<Digest, Arc<fetch::Inflight>>>,
}

impl Cache {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>) -> Self {
        Cache {
            blobs,
            meta,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The cache on a local directory (the only backend so far), with
    /// metadata kept under an old namespace name moved to its upstream's.
    pub fn open_local(dir: &Path, namespace_moves: &[(String, String)]) -> io::Result<Self> {
        let store = Arc::new(LocalStore::open_dir(dir)?);
        store.migrate_namespaces(namespace_moves)?;
        Ok(Cache::new(store.clone(), store))
    }

    /// What is stored under `d`, without opening it.
    pub async fn stat(&self, d: &Digest) -> Result<Option<BlobInfo>, FetchError> {
        self.blobs.stat(d).await.map_err(|e| FetchError::store(d, "stat", e))
    }

    /// Stored content, opened for serving; `None` when not stored.
    pub async fn open_stored(&self, d: &Digest) -> Result<Option<Served>, FetchError> {
        let blob = self.blobs.open(d).await.map_err(|e| FetchError::store(d, "open", e))?;
        Ok(blob.map(|b| Served::stored(b, true)))
    }

    /// Remembers upstream's answer for a tag. A failure is logged, not
    /// returned: the answer is served either way.
    pub async fn record_tag(&self, at: RepoKey<'_>, tag: &Tag, accept_key: &str, rec: &TagRecord) {
        if let Err(e) = self.meta.put_tag(at, tag, accept_key, rec).await {
            tracing::warn!(repo = %at.repo, %tag, error = %e, "could not record tag");
        }
    }

    pub async fn last_tag(&self, at: RepoKey<'_>, tag: &Tag, accept_key: &str) -> Option<TagRecord> {
        match self.meta.get_tag(at, tag, accept_key).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(repo = %at.repo, %tag, error = %e, "could not read tag record");
                None
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

    /// Repositories of `upstream` the cache holds tags for.
    pub async fn repositories(&self, upstream: &str) -> io::Result<Vec<String>> {
        self.meta.list_repositories(upstream).await
    }
}
