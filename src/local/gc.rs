//! What the local namespaces hold, and collecting what they no longer
//! need, for the operator's `regmirror cache` commands.
//!
//! A repository holds the manifests linked to it and everything they
//! reference. A blob link no manifest of its repository references goes
//! once it is older than [`GC_GRACE`] (a push uploads its blobs before its
//! manifest, so a young link may be a push in progress); content no
//! repository links any more, and that the cache does not hold as cached
//! content (in its recency index), is deleted. A client reading it keeps
//! its open file.

use std::collections::HashSet;
use std::time::Duration;

use crate::cache::blob_store::BlobStore;
use crate::cache::listing::read_stored;
use crate::cache::{HostedStore, Link};
use crate::reference::{Digest, RepoName};

/// How old an unreferenced blob link must be before gc removes it.
pub const GC_GRACE: Duration = Duration::from_secs(3600);

/// Every digest a local repository links, in `namespaces`.
pub async fn held(store: &dyn HostedStore, namespaces: &[String]) -> std::io::Result<HashSet<Digest>> {
    let mut out = HashSet::new();
    for ns in namespaces {
        for repo in store.repositories(ns).await? {
            for kind in [Link::Blob, Link::Manifest] {
                out.extend(store.links(&repo, kind).await?);
            }
        }
    }
    Ok(out)
}

/// What one collection did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub unlinked: usize,
    pub deleted: usize,
    pub bytes: u64,
}

/// Digests the manifests of `repo` reach.
async fn referenced(
    store: &dyn HostedStore,
    blobs: &dyn BlobStore,
    repo: &RepoName,
) -> std::io::Result<HashSet<Digest>> {
    let mut out = HashSet::new();
    for m in store.links(repo, Link::Manifest).await? {
        out.insert(m.clone());
        let Some(bytes) = read_stored(blobs, &m).await else {
            continue;
        };
        if let Ok(refs) = super::manifests::references(&bytes) {
            out.extend(refs.blobs);
            out.extend(refs.manifests);
        }
    }
    Ok(out)
}

/// Unlinks unreferenced blobs older than `grace` from every repository of
/// `namespaces`, and forgets deleted manifests; of those, deletes the
/// content nobody links any more that `cached` does not claim (the cache's
/// own content stays under its LRU).
pub async fn collect(
    store: &dyn HostedStore,
    blobs: &dyn BlobStore,
    namespaces: &[String],
    grace: Duration,
    cached: &(dyn Fn(&Digest) -> bool + Sync),
) -> std::io::Result<Collected> {
    let mut done = Collected::default();
    let mut candidates = Vec::new();
    for ns in namespaces {
        for repo in store.repositories(ns).await? {
            let keep = referenced(store, blobs, &repo).await?;
            for d in store.links(&repo, Link::Deleted).await? {
                store.unlink(&repo, Link::Deleted, &d).await?;
                candidates.push(d);
            }
            for d in store.links(&repo, Link::Blob).await? {
                if keep.contains(&d) {
                    continue;
                }
                let old = store.link_age(&repo, Link::Blob, &d).await?.is_some_and(|a| a >= grace);
                if old && store.unlink(&repo, Link::Blob, &d).await? {
                    done.unlinked += 1;
                    candidates.push(d);
                }
            }
        }
    }
    let still = held(store, namespaces).await?;
    let mut seen = HashSet::new();
    for d in candidates {
        if !seen.insert(d.clone()) || still.contains(&d) || cached(&d) {
            continue;
        }
        if let Some(info) = blobs.stat(&d).await? {
            blobs.delete(&d).await?;
            done.deleted += 1;
            done.bytes += info.size;
        }
    }
    Ok(done)
}
