//! The interface for what pushed (local) repositories record besides
//! content: which digests each repository holds, its tags, and the
//! referrers of each subject. Content itself stays in the shared
//! content-addressed [`BlobStore`](super::BlobStore): a layer pushed to two
//! repositories, or pulled through the mirror and then pushed, is one copy.
//!
//! Repositories are named as clients push them, namespace first
//! (`private/team/app`). A digest is readable in a repository only while
//! linked to it, which is what keeps one repository's pushes out of another
//! that never mounted them.

use std::io;

use async_trait::async_trait;

use crate::reference::{Digest, RepoName, Tag};

/// What a repository holds a digest as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A layer or config, pushed or mounted.
    Blob,
    /// A manifest or index, pushed with a media type.
    Manifest,
    /// A manifest deleted through the API: its content waits for gc.
    Deleted,
}

#[async_trait]
pub trait HostedStore: Send + Sync + 'static {
    async fn link(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<()>;
    async fn linked(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<bool>;
    /// True when the digest was linked.
    async fn unlink(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<bool>;
    async fn links(&self, repo: &RepoName, link: Link) -> io::Result<Vec<Digest>>;
    /// How long ago the digest was linked; `None` when it is not.
    async fn link_age(&self, repo: &RepoName, link: Link, d: &Digest) -> io::Result<Option<std::time::Duration>>;
    async fn set_tag(&self, repo: &RepoName, tag: &Tag, d: &Digest) -> io::Result<()>;
    async fn tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<Option<Digest>>;
    /// True when the tag existed.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> io::Result<bool>;
    /// Every tag and what it points at, sorted by tag.
    async fn tags(&self, repo: &RepoName) -> io::Result<Vec<(Tag, Digest)>>;
    /// Records `referrer` (a manifest whose `subject` is `subject`), with
    /// the descriptor the referrers API lists it by.
    async fn add_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &[u8],
    ) -> io::Result<()>;
    async fn remove_referrer(&self, repo: &RepoName, subject: &Digest, referrer: &Digest) -> io::Result<()>;
    /// The descriptors of `subject`'s referrers, in no particular order.
    async fn referrers(&self, repo: &RepoName, subject: &Digest) -> io::Result<Vec<Vec<u8>>>;
    /// Repositories under `namespace` that hold anything, sorted.
    async fn repositories(&self, namespace: &str) -> io::Result<Vec<RepoName>>;
}

/// The records a pushed repository holds, by name: the same in every
/// backend's layout (`<repo>/_blobs/<alg>-<hex>`, ...). Repository
/// components never start with `_` (the OCI name grammar), so these cannot
/// collide with a nested repository.
pub(super) const RECORDS: [&str; 5] = ["_blobs", "_manifests", "_tags", "_referrers", "_deleted"];

/// Where a backend keeps the links of one kind.
pub(super) fn link_dir(link: Link) -> &'static str {
    match link {
        Link::Blob => "_blobs",
        Link::Manifest => "_manifests",
        Link::Deleted => "_deleted",
    }
}

/// A digest as one path or key component (`sha256-<hex>`).
pub(super) fn digest_name(d: &Digest) -> String {
    format!("{}-{}", d.algorithm().name(), d.hex())
}

pub(super) fn parse_digest_name(name: &str) -> Option<Digest> {
    let (alg, hex) = name.split_once('-')?;
    Digest::parse(&format!("{alg}:{hex}")).ok()
}
