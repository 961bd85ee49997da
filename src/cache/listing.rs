//! What the cache holds, as images: per upstream, each recorded tag with
//! the bytes of stored content it reaches and its last use. One walk shared
//! by `regmirror cache ls` and the status page, so both say the same.
//!
//! Reads only: it never changes a record, a blob or the recency index.

use super::blob_store::BlobStore;
use super::index::Index;
use super::meta_store::{MetaStore, RepoKey};
use crate::reference::{Digest, RepoName};

/// Where a listing's sizes and last uses come from.
pub enum Usage<'a> {
    /// The disk backend's recency index.
    Index(&'a Index),
    /// What a listing of the bucket found: digest → (size, last use in ms
    /// since the Unix epoch), see [`super::bucket_evict::usage`].
    Listed(&'a std::collections::HashMap<String, (u64, u64)>),
    /// Neither known: sizes and last uses show as 0.
    Unknown,
}

impl Usage<'_> {
    fn get(&self, digest: &str) -> Option<(u64, u64)> {
        match self {
            Usage::Index(index) => index.get(digest).ok().flatten().map(|e| (e.size, e.last_used_ms)),
            Usage::Listed(map) => map.get(digest).copied(),
            Usage::Unknown => None,
        }
    }
}

/// Manifests larger than this are not read to follow their references.
const MAX_WALKED_MANIFEST: u64 = 4 << 20;

/// One recorded tag (per media type upstream answered with).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedTag {
    pub upstream: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    /// Bytes of the stored content the tag reaches (shared blobs counted in each tag).
    pub size: u64,
    /// Last use of the tag's manifest, ms since the Unix epoch (0: not stored).
    pub last_used_ms: u64,
}

/// Digests a manifest names: config, layers, and (for an index) the
/// platform manifests with their `os/arch`. Anything unparsable names
/// nothing.
pub fn references(manifest: &[u8]) -> (Vec<String>, Vec<(String, String)>) {
    let v: serde_json::Value = serde_json::from_slice(manifest).unwrap_or_default();
    let mut blobs = Vec::new();
    if let Some(d) = v["config"]["digest"].as_str() {
        blobs.push(d.to_string());
    }
    for l in v["layers"].as_array().into_iter().flatten() {
        if let Some(d) = l["digest"].as_str() {
            blobs.push(d.to_string());
        }
    }
    let mut children = Vec::new();
    for m in v["manifests"].as_array().into_iter().flatten() {
        if let Some(d) = m["digest"].as_str() {
            let p = &m["platform"];
            let platform = format!(
                "{}/{}",
                p["os"].as_str().unwrap_or(""),
                p["architecture"].as_str().unwrap_or("")
            );
            children.push((d.to_string(), platform));
        }
    }
    (blobs, children)
}

/// A stored blob read whole, when it is small enough to be a manifest.
pub async fn read_stored(blobs: &dyn BlobStore, d: &Digest) -> Option<Vec<u8>> {
    use futures_util::TryStreamExt;
    let blob = blobs.open(d).await.ok()??;
    let size = blob.info().size;
    if size > MAX_WALKED_MANIFEST {
        return None;
    }
    let chunks: Vec<bytes::Bytes> = blob.read(0, size).try_collect().await.ok()?;
    Some(chunks.concat())
}

/// Every digest `root` reaches through the store: itself, and for a
/// manifest its config and layers, for an index its stored manifests too.
pub async fn closure(blobs: &dyn BlobStore, root: &Digest) -> Vec<Digest> {
    let mut out = vec![root.clone()];
    let mut queue = vec![root.clone()];
    while let Some(d) = queue.pop() {
        let Some(bytes) = read_stored(blobs, &d).await else {
            continue;
        };
        let (named, children) = references(&bytes);
        for b in named.iter().chain(children.iter().map(|(d, _)| d)) {
            if let Ok(b) = Digest::parse(b) {
                if !out.contains(&b) {
                    out.push(b.clone());
                    queue.push(b);
                }
            }
        }
    }
    out
}

/// Every tag recorded for `upstreams`, in their order, repositories and
/// tags sorted as the store lists them. Sizes and last use come from the
/// recency index; without one (not open yet) they are 0.
pub async fn cached_tags(
    blobs: &dyn BlobStore,
    meta: &dyn MetaStore,
    usage: Usage<'_>,
    upstreams: &[String],
) -> std::io::Result<Vec<CachedTag>> {
    let mut rows = Vec::new();
    for upstream in upstreams {
        for repo in meta.list_repositories(upstream).await? {
            let Ok(name) = RepoName::parse(&repo) else { continue };
            let at = RepoKey { upstream, repo: &name };
            for tag in meta.list_tags(at).await? {
                for rec in meta.get_tags(at, &tag).await? {
                    let Ok(d) = Digest::parse(&rec.digest) else { continue };
                    let mut size = 0;
                    let mut last_used_ms = 0;
                    if !matches!(usage, Usage::Unknown) {
                        for b in closure(blobs, &d).await {
                            size += usage.get(b.as_str()).map_or(0, |(size, _)| size);
                        }
                        last_used_ms = usage.get(&rec.digest).map_or(0, |(_, used)| used);
                    }
                    rows.push(CachedTag {
                        upstream: upstream.clone(),
                        repository: repo.clone(),
                        tag: tag.as_str().to_string(),
                        digest: rec.digest,
                        media_type: rec.media_type,
                        size,
                        last_used_ms,
                    });
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_of_manifests_indexes_and_garbage() {
        let m = br#"{"config":{"digest":"sha256:c"},"layers":[{"digest":"sha256:l1"},{"digest":"sha256:l2"}]}"#;
        assert_eq!(references(m).0, ["sha256:c", "sha256:l1", "sha256:l2"]);
        let i = br#"{"manifests":[{"digest":"sha256:a","platform":{"os":"linux","architecture":"arm64"}}]}"#;
        assert_eq!(references(i).1, [("sha256:a".to_string(), "linux/arm64".to_string())]);
        assert_eq!(references(b"\xff not json"), (vec![], vec![]));
    }
}
