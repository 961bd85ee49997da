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

/// The last answer upstream gave for a tag in one media type, kept so the
/// tag can be served when upstream is down to any client whose Accept
/// admits that type, whichever client asked first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: String,
    /// The media type upstream served the manifest with (no parameters);
    /// records are kept per media type, one each.
    pub media_type: String,
    pub size: u64,
    /// Upstream gave this answer to an anonymous request: any client may
    /// be served it when upstream is down. Records written before
    /// provenance was kept lack the field and read as public: the versions
    /// that wrote them served every record to every client already.
    #[serde(default = "written_before_provenance")]
    pub public: bool,
    /// When upstream last gave this answer (ms since the Unix epoch); 0 in
    /// records written before it was kept (the backend then supplies the
    /// record's modification time).
    #[serde(default)]
    pub seen_ms: u64,
}

fn written_before_provenance() -> bool {
    true
}

/// Where a record belongs: one repository of one upstream.
#[derive(Debug, Clone, Copy)]
pub struct RepoKey<'a> {
    pub upstream: &'a str,
    pub repo: &'a RepoName,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Keeps `rec` as the answer for (`tag`, `rec.media_type`), replacing
    /// the one for that media type.
    async fn put_tag(&self, at: RepoKey<'_>, tag: &Tag, rec: &TagRecord) -> io::Result<()>;
    /// Every record of `tag`, one per media type (the most recent when
    /// older stores hold several), in no particular order.
    async fn get_tags(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<Vec<TagRecord>>;
    /// Tags of a repository with at least one record, sorted.
    async fn list_tags(&self, at: RepoKey<'_>) -> io::Result<Vec<Tag>>;
    /// Forgets every record of `tag` (the operator's `cache rm`).
    async fn delete_tag(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<()>;
    async fn put_tag_list(&self, at: RepoKey<'_>, key: &str, body: &[u8]) -> io::Result<()>;
    async fn get_tag_list(&self, at: RepoKey<'_>, key: &str) -> io::Result<Option<Vec<u8>>>;
    /// Repositories of `upstream` with at least one tag record, sorted.
    async fn list_repositories(&self, upstream: &str) -> io::Result<Vec<String>>;
}
