//! Where cached bytes live: the storage interface and its local-disk backend.
//!
//! Layout under `cache.dir` (copy the directory to another host and it works
//! there):
//!
//! ```text
//! blobs/sha256/<aa>/<hex>        content (blobs and manifests alike, shared by every repository)
//! blobs/sha256/<aa>/<hex>.type   media type, for manifests
//! tags/<namespace>/<repo>/_tags/<tag>/<accept-key>.json   last digest seen for (repo, tag, Accept)
//! tags/<namespace>/<repo>/_lists/<query-key>.json         last tags/list answer
//! tmp/                           downloads in progress (same filesystem: commit is a rename)
//! ```
//!
//! Every file-system call of the cache is in this module, so another backend
//! (an S3-compatible object store with this disk as its read cache) is an
//! addition, not a rewrite. Start-up never walks the store.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::fs;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, AsyncWriteExt};

use crate::reference::{Digest, RepoName, Tag};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    /// Stored for manifests; `None` for layers and configs.
    pub media_type: Option<String>,
}

/// The last answer upstream gave for a tag, kept so the tag can be served
/// when upstream is down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// What a cache backend must offer. Writes go through a pending object that
/// is either committed (after the caller verified the digest) or aborted;
/// nothing half-written is ever visible under a digest.
pub trait Store: Send + Sync + 'static {
    type Reader: AsyncRead + AsyncSeek + Send + Unpin + 'static;
    type Pending: AsyncWrite + Send + Unpin + 'static;

    fn open(&self, d: &Digest) -> impl Future<Output = io::Result<Option<(Self::Reader, BlobInfo)>>> + Send;
    fn stat(&self, d: &Digest) -> impl Future<Output = io::Result<Option<BlobInfo>>> + Send;
    /// Starts a download; the returned id lets readers follow it while it grows.
    fn begin(&self, d: &Digest) -> impl Future<Output = io::Result<(Self::Pending, PathBuf)>> + Send;
    /// Opens a download in progress for reading.
    fn open_pending(&self, id: &Path) -> impl Future<Output = io::Result<Self::Reader>> + Send;
    fn commit(
        &self,
        pending: Self::Pending,
        id: &Path,
        d: &Digest,
        media_type: Option<&str>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn abort(&self, pending: Self::Pending, id: &Path) -> impl Future<Output = ()> + Send;
    fn delete(&self, d: &Digest) -> impl Future<Output = io::Result<()>> + Send;
    fn put_tag(
        &self,
        ns: &str,
        repo: &RepoName,
        tag: &Tag,
        accept_key: &str,
        rec: &TagRecord,
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn get_tag(
        &self,
        ns: &str,
        repo: &RepoName,
        tag: &Tag,
        accept_key: &str,
    ) -> impl Future<Output = io::Result<Option<TagRecord>>> + Send;
    fn put_tag_list(
        &self,
        ns: &str,
        repo: &RepoName,
        key: &str,
        body: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn get_tag_list(
        &self,
        ns: &str,
        repo: &RepoName,
        key: &str,
    ) -> impl Future<Output = io::Result<Option<Vec<u8>>>> + Send;
    /// Repositories with at least one tag record, for `/v2/_catalog`.
    fn list_repositories(&self, ns: &str) -> impl Future<Output = io::Result<Vec<String>>> + Send;
}

/// The local-directory backend.
pub struct LocalStore {
    root: PathBuf,
    counter: AtomicU64,
}

impl LocalStore {
    /// Opens the store, creating its directories and clearing `tmp/` (left
    /// over from a crash). Does not walk the store.
    pub fn open_dir(root: &Path) -> io::Result<Self> {
        let ctx = |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
        let tmp = root.join("tmp");
        match std::fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(&tmp, e)),
        }
        for d in [root.join("blobs/sha256"), root.join("tags"), tmp] {
            std::fs::create_dir_all(&d).map_err(|e| ctx(&d, e))?;
        }
        Ok(LocalStore {
            root: root.to_path_buf(),
            counter: AtomicU64::new(0),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(&d.hex()[..2]).join(d.hex())
    }

    fn type_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(&d.hex()[..2])
            .join(format!("{}.type", d.hex()))
    }

    fn repo_dir(&self, ns: &str, repo: &RepoName) -> PathBuf {
        let mut p = self.root.join("tags").join(ns);
        for c in repo.components() {
            p.push(c);
        }
        p
    }

    fn tag_path(&self, ns: &str, repo: &RepoName, tag: &Tag, accept_key: &str) -> PathBuf {
        self.repo_dir(ns, repo)
            .join("_tags")
            .join(tag.as_str())
            .join(format!("{}.json", safe_key(accept_key)))
    }

    async fn media_type(&self, d: &Digest) -> io::Result<Option<String>> {
        match fs::read_to_string(self.type_path(d)).await {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Keys are hex already; this only guards against a caller passing a path.
fn safe_key(k: &str) -> String {
    k.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect()
}

async fn write_atomically(root: &Path, path: &Path, data: &[u8], counter: &AtomicU64) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).await?;
    }
    let tmp = root.join("tmp").join(format!(
        "meta.{}.{}",
        std::process::id(),
        counter.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, data).await?;
    fs::rename(&tmp, path).await
}

fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store for LocalStore {
    type Reader = fs::File;
    type Pending = fs::File;

    async fn open(&self, d: &Digest) -> io::Result<Option<(fs::File, BlobInfo)>> {
        let Some(file) = not_found_is_none(fs::File::open(self.blob_path(d)).await)? else {
            return Ok(None);
        };
        let size = file.metadata().await?.len();
        Ok(Some((
            file,
            BlobInfo {
                size,
                media_type: self.media_type(d).await?,
            },
        )))
    }

    async fn stat(&self, d: &Digest) -> io::Result<Option<BlobInfo>> {
        let Some(meta) = not_found_is_none(fs::metadata(self.blob_path(d)).await)? else {
            return Ok(None);
        };
        Ok(Some(BlobInfo {
            size: meta.len(),
            media_type: self.media_type(d).await?,
        }))
    }

    async fn begin(&self, d: &Digest) -> io::Result<(fs::File, PathBuf)> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}.{}.{n}", d.hex(), std::process::id()));
        let file = fs::OpenOptions::new().write(true).create_new(true).open(&path).await?;
        Ok((file, path))
    }

    async fn open_pending(&self, id: &Path) -> io::Result<fs::File> {
        fs::File::open(id).await
    }

    async fn commit(&self, mut pending: fs::File, id: &Path, d: &Digest, media_type: Option<&str>) -> io::Result<()> {
        pending.flush().await?;
        pending.sync_data().await?;
        drop(pending);
        if let Some(t) = media_type {
            write_atomically(&self.root, &self.type_path(d), t.as_bytes(), &self.counter).await?;
        }
        let dest = self.blob_path(d);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).await?;
        }
        fs::rename(id, &dest).await
    }

    async fn abort(&self, pending: fs::File, id: &Path) {
        drop(pending);
        if let Err(e) = fs::remove_file(id).await {
            tracing::warn!(path = %id.display(), error = %e, "could not remove aborted download");
        }
    }

    async fn delete(&self, d: &Digest) -> io::Result<()> {
        not_found_is_none(fs::remove_file(self.blob_path(d)).await)?;
        not_found_is_none(fs::remove_file(self.type_path(d)).await)?;
        Ok(())
    }

    async fn put_tag(&self, ns: &str, repo: &RepoName, tag: &Tag, accept_key: &str, rec: &TagRecord) -> io::Result<()> {
        let data = serde_json::to_vec(rec).map_err(io::Error::other)?;
        write_atomically(
            &self.root,
            &self.tag_path(ns, repo, tag, accept_key),
            &data,
            &self.counter,
        )
        .await
    }

    async fn get_tag(&self, ns: &str, repo: &RepoName, tag: &Tag, accept_key: &str) -> io::Result<Option<TagRecord>> {
        let Some(data) = not_found_is_none(fs::read(self.tag_path(ns, repo, tag, accept_key)).await)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&data).ok())
    }

    async fn put_tag_list(&self, ns: &str, repo: &RepoName, key: &str, body: &[u8]) -> io::Result<()> {
        let path = self
            .repo_dir(ns, repo)
            .join("_lists")
            .join(format!("{}.json", safe_key(key)));
        write_atomically(&self.root, &path, body, &self.counter).await
    }

    async fn get_tag_list(&self, ns: &str, repo: &RepoName, key: &str) -> io::Result<Option<Vec<u8>>> {
        let path = self
            .repo_dir(ns, repo)
            .join("_lists")
            .join(format!("{}.json", safe_key(key)));
        not_found_is_none(fs::read(path).await)
    }

    async fn list_repositories(&self, ns: &str) -> io::Result<Vec<String>> {
        let base = self.root.join("tags").join(ns);
        let mut out = Vec::new();
        let mut stack = vec![(base, String::new())];
        while let Some((dir, name)) = stack.pop() {
            let Some(mut entries) = not_found_is_none(fs::read_dir(&dir).await)? else {
                continue;
            };
            while let Some(e) = entries.next_entry().await? {
                let child = e.file_name().to_string_lossy().into_owned();
                if child == "_tags" {
                    out.push(name.clone());
                } else if !child.starts_with('_') && e.file_type().await?.is_dir() {
                    let n = if name.is_empty() {
                        child
                    } else {
                        format!("{name}/{child}")
                    };
                    stack.push((e.path(), n));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn committed_blobs_are_readable_and_aborted_ones_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_dir(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(store.stat(&d).await.unwrap().is_none());
        let (mut w, id) = store.begin(&d).await.unwrap();
        w.write_all(b"hello").await.unwrap();
        store.commit(w, &id, &d, Some("application/x")).await.unwrap();
        let (mut r, info) = store.open(&d).await.unwrap().unwrap();
        assert_eq!(
            info,
            BlobInfo {
                size: 5,
                media_type: Some("application/x".into())
            }
        );
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello");

        let other = Digest::of(b"other");
        let (w, id) = store.begin(&other).await.unwrap();
        store.abort(w, &id).await;
        assert!(!id.exists());
        assert!(store.stat(&other).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tmp_is_cleared_on_open_and_tags_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();
        let store = LocalStore::open_dir(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/leftover").exists());
        let rec = TagRecord {
            digest: Digest::of(b"m").to_string(),
            media_type: "t".into(),
            size: 1,
        };
        let repo = RepoName::parse("library/alpine").unwrap();
        let tag = Tag::parse("3").unwrap();
        store.put_tag("dockerhub", &repo, &tag, "k", &rec).await.unwrap();
        store
            .put_tag("dockerhub", &RepoName::parse("org/app/x").unwrap(), &tag, "k", &rec)
            .await
            .unwrap();
        assert_eq!(store.get_tag("dockerhub", &repo, &tag, "k").await.unwrap(), Some(rec));
        assert_eq!(store.get_tag("dockerhub", &repo, &tag, "other").await.unwrap(), None);
        assert_eq!(
            store.list_repositories("dockerhub").await.unwrap(),
            vec!["library/alpine", "org/app/x"]
        );
        assert!(store.list_repositories("quay").await.unwrap().is_empty());
    }
}
