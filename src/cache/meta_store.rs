//! The interface for what the cache knows besides content: the last answer
//! upstream gave for each tag and tag list, and which repositories it has
//! seen. Keyed by the upstream's own name (`docker.io`) and upstream's
//! repository name, never by how a client addressed it, so changing a
//! namespace prefix or a routing mode loses nothing. Access times and
//! provenance records belong here too as they arrive.

use std::io;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::reference::{RepoName, Tag};

/// The last answer upstream gave for a tag, kept so the tag can be served
/// when upstream is down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Upstream gave this answer to an anonymous request: any client may
    /// be served it when upstream is down. Records from before provenance
    /// was kept read as not public.
    #[serde(default)]
    pub public: bool,
}

/// Where a record belongs: one repository of one upstream.
#[derive(Debug, Clone, Copy)]
pub struct RepoKey<'a> {
    pub upstream: &'a str,
    pub repo: &'a RepoName,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    async fn put_tag(&self, at: RepoKey<'_>, tag: &Tag, accept_key: &str, rec: &TagRecord) -> io::Result<()>;
    async fn get_tag(&self, at: RepoKey<'_>, tag: &Tag, accept_key: &str) -> io::Result<Option<TagRecord>>;
    async fn put_tag_list(&self, at: RepoKey<'_>, key: &str, body: &[u8]) -> io::Result<()>;
    async fn get_tag_list(&self, at: RepoKey<'_>, key: &str) -> io::Result<Option<Vec<u8>>>;
    /// Repositories of `upstream` with at least one tag record, sorted.
    async fn list_repositories(&self, upstream: &str) -> io::Result<Vec<String>>;
}
