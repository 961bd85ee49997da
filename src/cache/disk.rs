//! The local-directory backend, for both content and metadata.
//!
//! Layout under `cache.dir` (copy the directory to another host and it works
//! there):
//!
//! ```text
//! blobs/<algorithm>/<aa>/<hex>        content (blobs and manifests alike, shared by every repository)
//! blobs/<algorithm>/<aa>/<hex>.type   media type, for manifests
//! blobs/<algorithm>/<aa>/<hex>.public present when the content is public (provenance)
//! meta/<upstream>/<repo>/_tags/<tag>/mt-<type-key>.json  last digest seen for (repo, tag, media type)
//! meta/<upstream>/<repo>/_lists/<query-key>.json         last tags/list answer
//! tmp/                           downloads in progress (same filesystem: commit is a rename)
//! uploads/<id>                   pushes in progress (cleared at start, like tmp/)
//! local/<repo>/...               pushed repositories (see `disk_hosted`)
//! ```
//!
//! Stores written before metadata was keyed by upstream name kept it under
//! `tags/<namespace>/`; [`DiskStore::migrate_namespaces`] moves it. Stores
//! written before tag records were kept per media type hold one record per
//! Accept list (`<accept-key>.json`) beside them: those are read like the
//! others (each names its media type) and removed once a record of the same
//! media type replaces them.
//!
//! Every file-system call of the cache is in this module, and each runs off
//! the async runtime's worker threads. Start-up never walks the store.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::FutureExt;
use tokio::fs;

use super::blob_store::{BlobInfo, BlobStore, ByteStream, GrowingBlob, ListedBlob, PendingBlob, StoredBlob};
use super::meta_store::{MetaStore, RepoKey, TagRecord};
use crate::reference::{Digest, RepoName, Tag};

/// The most a stored read hands out at once.
pub const READ_CHUNK: usize = 256 * 1024;

pub struct DiskStore {
    root: PathBuf,
    counter: AtomicU64,
    /// Content is synced to disk before it becomes visible. False for a
    /// read cache in front of a bucket, which is emptied after a crash
    /// instead (see [`DiskStore::open_read_cache`]).
    durable: bool,
}

/// Written when a read cache is closed cleanly; absent at start, the
/// process before died and the read cache is emptied.
const CLEAN_MARK: &str = "read-cache.clean";

impl DiskStore {
    /// Opens the store, creating its directories and clearing `tmp/` (left
    /// over from a crash). Does not walk the store. Refuses a directory that
    /// holds anything but a regmirror store, since regmirror deletes inside
    /// it (`cache.dir = "/"` must not cost anyone their `/tmp`).
    pub fn open_dir(root: &Path) -> io::Result<Self> {
        adopt(root)?;
        let tmp = root.join("tmp");
        // Upload sessions live in memory (their digest state above all), so
        // what a crash left of them can never be finished.
        let uploads = root.join("uploads");
        for dir in [&tmp, &uploads] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(dir, e)),
            }
        }
        for d in [root.join("blobs/sha256"), root.join("meta"), tmp, uploads] {
            std::fs::create_dir_all(&d).map_err(|e| with_path(&d, e))?;
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
            counter: AtomicU64::new(0),
            durable: true,
        })
    }

    /// Opens a store another process may be serving from, for the
    /// operator's commands: nothing is created or cleared (its `tmp/` holds
    /// that process's downloads), and a directory that is not a marked
    /// store is refused.
    pub fn attach(root: &Path) -> io::Result<Self> {
        if !root.join(MARKER).is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is not a regmirror store (no {MARKER}); is cache.dir right?",
                    root.display()
                ),
            ));
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
            counter: AtomicU64::new(0),
            durable: true,
        })
    }

    /// Opens `root` as a read cache in front of a bucket that holds all of
    /// it: commits skip the disk sync a store of record needs, and what a
    /// crash may have left torn is never served, because a read cache not
    /// closed cleanly ([`DiskStore::mark_clean`]) is emptied here (with its
    /// recency index, `index_file`). A crash costs reads from the bucket.
    pub fn open_read_cache(root: &Path, index_file: &str) -> io::Result<Self> {
        let mut store = DiskStore::open_dir(root)?;
        store.durable = false;
        let mark = root.join(CLEAN_MARK);
        let clean = mark.is_file();
        let blobs = root.join("blobs");
        let has_content = std::fs::read_dir(blobs.join("sha256"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if !clean && has_content {
            tracing::warn!(dir = %root.display(), "the local read cache was not closed cleanly: emptied (the bucket holds everything in it)");
            std::fs::remove_dir_all(&blobs).map_err(|e| with_path(&blobs, e))?;
            std::fs::create_dir_all(blobs.join("sha256")).map_err(|e| with_path(&blobs, e))?;
            let index = root.join(index_file);
            match std::fs::remove_file(&index) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(&index, e)),
            }
        }
        match std::fs::remove_file(&mark) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(&mark, e)),
        }
        Ok(store)
    }

    /// A read cache closes cleanly: it is kept at the next start.
    pub fn mark_clean(&self) -> io::Result<()> {
        if self.durable {
            return Ok(());
        }
        // Everything written so far reaches the disk before the mark says
        // so: a power loss after a clean stop must not leave torn content
        // the mark vouches for.
        let dir = std::fs::File::open(&self.root).map_err(|e| with_path(&self.root, e))?;
        rustix::fs::syncfs(&dir).map_err(|e| with_path(&self.root, e.into()))?;
        let mark = self.root.join(CLEAN_MARK);
        std::fs::write(&mark, b"closed cleanly\n").map_err(|e| with_path(&mark, e))?;
        std::fs::File::open(&mark)
            .and_then(|f| f.sync_all())
            .map_err(|e| with_path(&mark, e))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves metadata kept under a client-facing namespace (`tags/dockerhub`)
    /// to its upstream's name (`meta/docker.io`). Each pair moves at most
    /// once; metadata already under the new name is kept.
    pub fn migrate_namespaces(&self, moves: &[(String, String)]) -> io::Result<()> {
        let old_root = self.root.join("tags");
        if !old_root.exists() {
            return Ok(());
        }
        for (namespace, upstream) in moves {
            let from = old_root.join(safe_component(namespace));
            let to = self.root.join("meta").join(safe_component(upstream));
            if from.is_dir() && !to.exists() {
                std::fs::rename(&from, &to).map_err(|e| with_path(&from, e))?;
                tracing::info!(from = %from.display(), to = %to.display(), "moved tag records to their upstream's name");
            }
        }
        // Gone once everything moved; anything left (an upstream no longer
        // configured) stays where it was.
        let _ = std::fs::remove_dir(&old_root);
        Ok(())
    }

    fn blob_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(d.algorithm().name()).join(&d.hex()[..2])
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d).join(d.hex())
    }

    fn type_path(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d).join(format!("{}.type", d.hex()))
    }

    fn public_path(&self, d: &Digest) -> PathBuf {
        self.blob_dir(d).join(format!("{}.public", d.hex()))
    }

    async fn is_public(&self, d: &Digest) -> io::Result<bool> {
        Ok(not_found_is_none(fs::metadata(self.public_path(d)).await)?.is_some())
    }

    fn repo_dir(&self, at: RepoKey<'_>) -> PathBuf {
        let mut p = self.root.join("meta").join(safe_component(at.upstream));
        for c in at.repo.components() {
            p.push(c);
        }
        p
    }

    fn tag_dir(&self, at: RepoKey<'_>, tag: &Tag) -> PathBuf {
        self.repo_dir(at).join("_tags").join(tag.as_str())
    }

    fn tag_path(&self, at: RepoKey<'_>, tag: &Tag, media_type: &str) -> PathBuf {
        self.tag_dir(at, tag)
            .join(format!("{TYPE_KEYED}{}.json", type_key(media_type)))
    }

    fn list_path(&self, at: RepoKey<'_>, key: &str) -> PathBuf {
        self.repo_dir(at).join("_lists").join(format!("{}.json", safe_key(key)))
    }

    fn temp_path(&self, what: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{what}.{}.{n}", std::process::id()))
    }

    /// Every readable record under a tag, with its file; a record without
    /// a time gets its file's modification time.
    async fn read_tag_dir(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<Vec<(PathBuf, TagRecord)>> {
        let Some(mut entries) = not_found_is_none(fs::read_dir(self.tag_dir(at, tag)).await)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await? {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(data) = not_found_is_none(fs::read(&path).await)? else {
                continue;
            };
            // A record that does not parse (cut short by a crash of an old
            // version) is skipped, never served.
            let Ok(mut rec) = serde_json::from_slice::<TagRecord>(&data) else {
                continue;
            };
            if rec.media_type.is_empty() {
                continue;
            }
            if rec.seen_ms == 0 {
                rec.seen_ms = epoch_ms(e.metadata().await.and_then(|m| m.modified()));
            }
            out.push((path, rec));
        }
        Ok(out)
    }

    async fn media_type(&self, d: &Digest) -> io::Result<Option<String>> {
        not_found_is_none(fs::read_to_string(self.type_path(d)).await)
    }

    /// A new file at `path` that commits to `d`'s place in the store, or
    /// to the place `commit_to` names (an upload learns its digest last).
    async fn pending_at(&self, path: PathBuf, d: Option<&Digest>) -> io::Result<DiskPending> {
        let writer = fs::OpenOptions::new().write(true).create_new(true).open(&path).await?;
        let writer = Arc::new(writer.into_std().await);
        // Opened now, by handle: followers keep reading the same file after
        // it is renamed into the store.
        let reader = match fs::File::open(&path).await {
            Ok(r) => r.into_std().await,
            Err(e) => {
                let _ = fs::remove_file(&path).await;
                return Err(e);
            }
        };
        Ok(DiskPending {
            writer: Some(writer),
            len: 0,
            reader: Arc::new(DiskGrowing { file: Arc::new(reader) }),
            temp: path,
            dest: d.map(|d| (self.blob_path(d), self.type_path(d))),
            blobs_root: self.root.join("blobs"),
            meta_temp: self.temp_path("type"),
            finished: false,
            unsynced: 0,
            syncing: None,
            durable: self.durable,
        })
    }

    /// Writes `data` to a temp file and renames it to `path`: readers see
    /// the old record or the new, never part of one.
    pub(super) async fn write_atomically(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).await?;
        }
        let tmp = self.temp_path("meta");
        fs::write(&tmp, data).await?;
        if let Err(e) = fs::rename(&tmp, path).await {
            let _ = fs::remove_file(&tmp).await;
            return Err(e);
        }
        Ok(())
    }
}

/// The file that marks a directory as a regmirror store.
pub const MARKER: &str = ".regmirror-store";

/// What a store made before the marker existed holds at its top level.
const UNMARKED_STORE_ENTRIES: [&str; 4] = ["blobs", "tags", "meta", "tmp"];

/// Makes `root` a store: a new or empty directory gets the marker; a marked
/// one is ours; an unmarked store of the layout before the marker is
/// adopted; anything else is refused with a message saying why.
fn adopt(root: &Path) -> io::Result<()> {
    std::fs::create_dir_all(root).map_err(|e| with_path(root, e))?;
    let marker = root.join(MARKER);
    if marker.is_file() {
        return Ok(());
    }
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| with_path(root, e))? {
        let name = entry.map_err(|e| with_path(root, e))?.file_name();
        let name = name.to_string_lossy().into_owned();
        if !UNMARKED_STORE_ENTRIES.contains(&name.as_str()) {
            foreign.push(name);
        }
    }
    let looks_like_old_store = root.join("blobs/sha256").is_dir();
    let has_entries = std::fs::read_dir(root)
        .map_err(|e| with_path(root, e))?
        .next()
        .is_some();
    if !foreign.is_empty() || (has_entries && !looks_like_old_store) {
        foreign.sort();
        foreign.truncate(5);
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is not empty and is not a regmirror store (no {MARKER}; it holds {}); \
                 regmirror deletes inside its store, so point cache.dir at a new or empty directory",
                root.display(),
                if foreign.is_empty() {
                    "files of another layout".to_string()
                } else {
                    foreign.join(", ")
                }
            ),
        ));
    }
    std::fs::write(
        &marker,
        b"regmirror content store; regmirror deletes inside this directory\n",
    )
    .map_err(|e| with_path(&marker, e))
}

fn with_path(p: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", p.display()))
}

/// Names of tag records keyed by media type start with this; others are
/// per-Accept records of older stores.
pub(super) const TYPE_KEYED: &str = "mt-";

/// A media type as a short file name: canonical (no parameters, lower case)
/// and hashed, so no client-chosen text becomes a path.
pub(super) fn type_key(media_type: &str) -> String {
    Digest::of(media_type.trim().to_ascii_lowercase().as_bytes()).hex()[..16].to_string()
}

/// Milliseconds since the Unix epoch of a file time (0 when unknown).
fn epoch_ms(t: io::Result<std::time::SystemTime>) -> u64 {
    t.ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Keys are hex already; this only guards against a caller passing a path.
pub(super) fn safe_key(k: &str) -> String {
    k.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect()
}

/// An upstream name or namespace as one directory name (`docker.io`).
pub(super) fn safe_component(s: &str) -> String {
    let c: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if c.is_empty() || c.chars().all(|c| c == '.') {
        "_".into()
    } else {
        c
    }
}

pub(super) fn not_found_is_none<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads up to `max` bytes at `pos` on a blocking thread.
async fn pread(file: Arc<std::fs::File>, pos: u64, max: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        // Read into spare capacity: zeroing the buffer first was a few
        // percent of a cold download's CPU.
        let mut buf = Vec::with_capacity(max);
        let n = rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), pos)?;
        // A much shorter read keeps only what it holds: chunks are counted
        // against the memory budget by their length.
        if n < max / 2 {
            buf.shrink_to_fit();
        }
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

#[async_trait]
impl BlobStore for DiskStore {
    async fn stat(&self, d: &Digest) -> io::Result<Option<BlobInfo>> {
        let Some(meta) = not_found_is_none(fs::metadata(self.blob_path(d)).await)? else {
            return Ok(None);
        };
        Ok(Some(BlobInfo {
            size: meta.len(),
            media_type: self.media_type(d).await?,
            public: self.is_public(d).await?,
        }))
    }

    async fn open(&self, d: &Digest) -> io::Result<Option<Box<dyn StoredBlob>>> {
        let path = self.blob_path(d);
        let opened = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            Ok::<_, io::Error>((file, size))
        })
        .await
        .map_err(io::Error::other)?;
        let Some((file, size)) = not_found_is_none(opened)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(DiskBlob {
            file: Arc::new(file),
            info: BlobInfo {
                size,
                media_type: self.media_type(d).await?,
                public: self.is_public(d).await?,
            },
        })))
    }

    async fn begin(&self, d: &Digest) -> io::Result<Box<dyn PendingBlob>> {
        let pending = self.pending_at(self.temp_path(d.hex()), Some(d)).await?;
        Ok(Box::new(pending))
    }

    async fn begin_upload(&self, id: &str) -> io::Result<Box<dyn PendingBlob>> {
        let name = safe_component(id);
        let pending = self.pending_at(self.root.join("uploads").join(name), None).await?;
        Ok(Box::new(pending))
    }

    async fn delete(&self, d: &Digest) -> io::Result<()> {
        not_found_is_none(fs::remove_file(self.blob_path(d)).await)?;
        not_found_is_none(fs::remove_file(self.type_path(d)).await)?;
        not_found_is_none(fs::remove_file(self.public_path(d)).await)?;
        Ok(())
    }

    async fn set_media_type(&self, d: &Digest, media_type: &str) -> io::Result<()> {
        self.write_atomically(&self.type_path(d), media_type.as_bytes()).await
    }

    async fn mark_public(&self, d: &Digest) -> io::Result<()> {
        self.write_atomically(&self.public_path(d), b"").await
    }
    async fn check_writable(&self) -> io::Result<()> {
        let probe = self.temp_path("ready");
        fs::write(&probe, b"ready").await?;
        fs::remove_file(&probe).await
    }

    async fn list(&self) -> io::Result<Vec<ListedBlob>> {
        let root = self.root.join("blobs");
        tokio::task::spawn_blocking(move || list_blobs(&root))
            .await
            .map_err(io::Error::other)?
    }
}

/// Walks `blobs/<algorithm>/<aa>/<hex>`; names that are not digests (type
/// files, strays) are skipped.
fn list_blobs(root: &Path) -> io::Result<Vec<ListedBlob>> {
    let mut out = Vec::new();
    let Some(algos) = not_found_is_none(std::fs::read_dir(root))? else {
        return Ok(out);
    };
    for algo in algos {
        let algo = algo?;
        let algo_name = algo.file_name().to_string_lossy().into_owned();
        for prefix in std::fs::read_dir(algo.path())? {
            let prefix = prefix?;
            if !prefix.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(prefix.path())? {
                let f = f?;
                let name = f.file_name().to_string_lossy().into_owned();
                let Ok(digest) = Digest::parse(&format!("{algo_name}:{name}")) else {
                    continue;
                };
                let Some(meta) = not_found_is_none(f.metadata())? else {
                    continue;
                };
                if !meta.is_file() {
                    continue;
                }
                out.push(ListedBlob {
                    manifest: prefix.path().join(format!("{name}.type")).exists(),
                    size: meta.len(),
                    modified_ms: epoch_ms(meta.modified()),
                    digest,
                });
            }
        }
    }
    Ok(out)
}

struct DiskBlob {
    file: Arc<std::fs::File>,
    info: BlobInfo,
}

impl StoredBlob for DiskBlob {
    fn info(&self) -> &BlobInfo {
        &self.info
    }

    fn read(self: Box<Self>, start: u64, end: u64) -> ByteStream {
        let file = self.file;
        Box::pin(futures_util::stream::try_unfold(start, move |pos| {
            let file = file.clone();
            async move {
                if pos >= end {
                    return Ok(None);
                }
                let want = (end - pos).min(READ_CHUNK as u64) as usize;
                let chunk = pread(file, pos, want).await?;
                if chunk.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cached content ended early",
                    ));
                }
                let next = pos + chunk.len() as u64;
                Ok(Some((chunk, next)))
            }
        }))
    }
}

struct DiskGrowing {
    file: Arc<std::fs::File>,
}

#[async_trait]
impl GrowingBlob for DiskGrowing {
    async fn read_at(&self, pos: u64, max: usize) -> io::Result<Bytes> {
        pread(self.file.clone(), pos, max).await
    }
}

struct DiskPending {
    writer: Option<Arc<std::fs::File>>,
    /// Bytes written so far: where the next write goes.
    len: u64,
    reader: Arc<DiskGrowing>,
    temp: PathBuf,
    /// The content's and its media type's places in the store, once known.
    dest: Option<(PathBuf, PathBuf)>,
    blobs_root: PathBuf,
    meta_temp: PathBuf,
    finished: bool,
    /// Bytes written since the last background sync started.
    unsynced: u64,
    /// A background `fdatasync` started while the download goes on.
    syncing: Option<tokio::task::JoinHandle<io::Result<()>>>,
    /// Synced before it becomes visible (see [`DiskStore::durable`]).
    durable: bool,
}

/// Written bytes after which a background `fdatasync` starts. The commit
/// must sync the whole blob before it is renamed into the store (crash
/// safety); syncing in steps while the download runs leaves the commit at
/// most this much to wait for instead of the whole blob (0.4 s for
/// 200 MiB on the benchmark machine's disk).
const SYNC_EVERY: u64 = 16 * 1024 * 1024;

impl DiskPending {
    /// Starts a background sync of what is written so far, unless one is
    /// still running (then the next write tries again).
    fn sync_in_background(&mut self) -> io::Result<()> {
        if let Some(h) = &self.syncing {
            if !h.is_finished() {
                return Ok(());
            }
        }
        if let Some(h) = self.syncing.take() {
            // Finished: a failed sync fails the download now.
            if let Some(Ok(Err(e))) = h.now_or_never() {
                return Err(e);
            }
        }
        self.unsynced = 0;
        let file = self.reader.file.clone();
        self.syncing = Some(tokio::task::spawn_blocking(move || file.sync_data()));
        Ok(())
    }

    async fn commit_inner(&mut self, media_type: Option<&str>) -> io::Result<()> {
        let w = self
            .writer
            .take()
            .ok_or_else(|| io::Error::other("pending blob already closed"))?;
        if let Some(h) = self.syncing.take() {
            h.await.map_err(io::Error::other)??;
        }
        if self.durable {
            tokio::task::spawn_blocking(move || w.sync_data())
                .await
                .map_err(io::Error::other)??;
        }
        let (dest, type_path) = self
            .dest
            .clone()
            .ok_or_else(|| io::Error::other("an upload commits with commit_to"))?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).await?;
        }
        if let Some(t) = media_type {
            fs::write(&self.meta_temp, t.as_bytes()).await?;
            fs::rename(&self.meta_temp, &type_path).await?;
        }
        fs::rename(&self.temp, &dest).await
    }
}

#[async_trait]
impl PendingBlob for DiskPending {
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        let w = self
            .writer
            .clone()
            .ok_or_else(|| io::Error::other("pending blob already closed"))?;
        let (at, n) = (self.len, data.len() as u64);
        // Positional, from the caller's buffer: no copy into a tokio::fs
        // buffer first.
        tokio::task::spawn_blocking(move || w.write_all_at(&data, at))
            .await
            .map_err(io::Error::other)??;
        self.len += n;
        self.unsynced += n;
        if self.durable && self.unsynced >= SYNC_EVERY {
            self.sync_in_background()?;
        }
        Ok(())
    }

    async fn reserve(&mut self, len: u64) -> io::Result<()> {
        let w = self
            .writer
            .as_ref()
            .ok_or_else(|| io::Error::other("pending blob already closed"))?;
        if len == 0 {
            return Ok(());
        }
        let file = w.clone();
        let reserved = tokio::task::spawn_blocking(move || {
            // KEEP_SIZE: the blocks are claimed, the file's length still
            // grows only with what is written.
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 0, len)
        })
        .await
        .map_err(io::Error::other)?;
        match reserved {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => Err(e.into()),
            // A file system that cannot preallocate: writes will tell.
            Err(_) => Ok(()),
        }
    }

    fn follower(&self) -> Arc<dyn GrowingBlob> {
        self.reader.clone()
    }

    async fn commit(mut self: Box<Self>, media_type: Option<&str>) -> io::Result<()> {
        let result = self.commit_inner(media_type).await;
        if result.is_ok() {
            self.finished = true;
        }
        // On failure, Drop removes what is left.
        result
    }

    async fn commit_to(mut self: Box<Self>, d: &Digest, media_type: Option<&str>) -> io::Result<()> {
        let dir = self.blobs_root.join(d.algorithm().name()).join(&d.hex()[..2]);
        self.dest = Some((dir.join(d.hex()), dir.join(format!("{}.type", d.hex()))));
        self.commit(media_type).await
    }

    fn written(&self) -> u64 {
        self.len
    }

    async fn abort(mut self: Box<Self>) {
        self.writer = None;
        self.finished = true;
        for p in [&self.temp, &self.meta_temp] {
            if let Err(e) = fs::remove_file(p).await {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove an aborted download");
                }
            }
        }
    }
}

impl Drop for DiskPending {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let paths = [self.temp.clone(), self.meta_temp.clone()];
        let remove = move || {
            for p in paths {
                let _ = std::fs::remove_file(p);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

#[async_trait]
impl MetaStore for DiskStore {
    async fn put_tag(&self, at: RepoKey<'_>, tag: &Tag, rec: &TagRecord) -> io::Result<()> {
        let data = serde_json::to_vec(rec).map_err(io::Error::other)?;
        self.write_atomically(&self.tag_path(at, tag, &rec.media_type), &data)
            .await?;
        // Per-Accept records of an older store that this one supersedes.
        for (path, old) in self.read_tag_dir(at, tag).await? {
            let legacy = !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TYPE_KEYED));
            if legacy && old.media_type.eq_ignore_ascii_case(&rec.media_type) {
                not_found_is_none(fs::remove_file(&path).await)?;
            }
        }
        Ok(())
    }

    async fn get_tags(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<Vec<TagRecord>> {
        let mut newest: Vec<TagRecord> = Vec::new();
        for (_, rec) in self.read_tag_dir(at, tag).await? {
            match newest
                .iter_mut()
                .find(|r| r.media_type.eq_ignore_ascii_case(&rec.media_type))
            {
                Some(r) if r.seen_ms >= rec.seen_ms => {}
                Some(r) => *r = rec,
                None => newest.push(rec),
            }
        }
        Ok(newest)
    }

    async fn list_tags(&self, at: RepoKey<'_>) -> io::Result<Vec<Tag>> {
        let Some(mut entries) = not_found_is_none(fs::read_dir(self.repo_dir(at).join("_tags")).await)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while let Some(e) = entries.next_entry().await? {
            if let Ok(t) = Tag::parse(&e.file_name().to_string_lossy()) {
                out.push(t);
            }
        }
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }

    async fn delete_tag(&self, at: RepoKey<'_>, tag: &Tag) -> io::Result<()> {
        not_found_is_none(fs::remove_dir_all(self.tag_dir(at, tag)).await)?;
        Ok(())
    }

    async fn put_tag_list(&self, at: RepoKey<'_>, key: &str, body: &[u8]) -> io::Result<()> {
        self.write_atomically(&self.list_path(at, key), body).await
    }

    async fn get_tag_list(&self, at: RepoKey<'_>, key: &str) -> io::Result<Option<Vec<u8>>> {
        not_found_is_none(fs::read(self.list_path(at, key)).await)
    }

    async fn list_repositories(&self, upstream: &str) -> io::Result<Vec<String>> {
        let base = self.root.join("meta").join(safe_component(upstream));
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
        // Names come from directories; keep only what is a valid repository.
        out.retain(|n| RepoName::parse(n).is_ok());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store_suite;

    fn store() -> (tempfile::TempDir, DiskStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open_dir(dir.path()).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_read_cache_not_closed_cleanly_is_emptied_and_one_closed_cleanly_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        async fn put(s: &DiskStore, data: &'static [u8]) -> Digest {
            let d = Digest::of(data);
            let mut p = s.begin(&d).await.unwrap();
            p.write(Bytes::from_static(data)).await.unwrap();
            p.commit(None).await.unwrap();
            d
        }
        let s = DiskStore::open_read_cache(dir.path(), "index.redb").unwrap();
        let kept = put(&s, b"kept").await;
        s.mark_clean().unwrap();
        drop(s);
        std::fs::write(dir.path().join("index.redb"), b"an index").unwrap();
        let s = DiskStore::open_read_cache(dir.path(), "index.redb").unwrap();
        assert!(s.stat(&kept).await.unwrap().is_some(), "closed cleanly: kept");
        assert!(dir.path().join("index.redb").exists());
        let lost = put(&s, b"written, then a crash").await;
        drop(s); // no mark_clean: the process died
        let s = DiskStore::open_read_cache(dir.path(), "index.redb").unwrap();
        assert!(s.stat(&lost).await.unwrap().is_none(), "a crash empties the read cache");
        assert!(s.stat(&kept).await.unwrap().is_none());
        assert!(!dir.path().join("index.redb").exists(), "and its index");
        // A store of record is never emptied.
        let durable = tempfile::tempdir().unwrap();
        let s = DiskStore::open_dir(durable.path()).unwrap();
        let d = put(&s, b"of record").await;
        drop(s);
        let s = DiskStore::open_dir(durable.path()).unwrap();
        assert!(s.stat(&d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn blob_store_suite() {
        let (_dir, s) = store();
        store_suite::blob_store(&s).await;
    }

    #[tokio::test]
    async fn meta_store_suite() {
        let (_dir, s) = store();
        store_suite::meta_store(&s).await;
    }

    #[tokio::test]
    async fn hosted_store_suite() {
        let (_dir, s) = store();
        store_suite::hosted_store(&s).await;
    }

    #[tokio::test]
    async fn aborted_and_dropped_downloads_leave_no_temp_file() {
        let (dir, s) = store();
        let tmp_files = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        let mut p = s.begin(&Digest::of(b"a")).await.unwrap();
        p.write(Bytes::from_static(b"a")).await.unwrap();
        p.abort().await;
        assert_eq!(tmp_files(), 0);
        let mut p = s.begin(&Digest::of(b"b")).await.unwrap();
        p.write(Bytes::from_static(b"b")).await.unwrap();
        drop(p);
        for _ in 0..100 {
            if tmp_files() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(tmp_files(), 0, "a pending blob dropped mid-way is removed");
    }

    #[test]
    fn only_new_empty_marked_or_old_store_directories_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("home");
        std::fs::create_dir_all(foreign.join("tmp")).unwrap();
        std::fs::write(foreign.join("tmp/precious"), b"x").unwrap();
        std::fs::write(foreign.join("notes.txt"), b"x").unwrap();
        let e = DiskStore::open_dir(&foreign)
            .err()
            .expect("a foreign directory is refused");
        assert!(e.to_string().contains("not a regmirror store"), "{e}");
        assert!(
            foreign.join("tmp/precious").exists(),
            "nothing deleted in a directory not ours"
        );

        let only_tmp = dir.path().join("only-tmp");
        std::fs::create_dir_all(only_tmp.join("tmp")).unwrap();
        std::fs::write(only_tmp.join("tmp/precious"), b"x").unwrap();
        assert!(
            DiskStore::open_dir(&only_tmp).is_err(),
            "a tmp/ alone does not make a store"
        );
        assert!(only_tmp.join("tmp/precious").exists());

        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        DiskStore::open_dir(&empty).unwrap();
        assert!(empty.join(MARKER).is_file());
        DiskStore::open_dir(&empty).expect("a marked store is reopened");

        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("blobs/sha256")).unwrap();
        std::fs::create_dir_all(old.join("tags/dockerhub")).unwrap();
        DiskStore::open_dir(&old).expect("a store from before the marker is adopted");
        assert!(old.join(MARKER).is_file());
    }

    /// Records of stores from before media-type keys (one per Accept list,
    /// no time) are served, newest per type, until a record of their type
    /// replaces them.
    #[tokio::test]
    async fn per_accept_records_of_older_stores_are_read_and_then_replaced() {
        let (dir, s) = store();
        let repo = RepoName::parse("library/app").unwrap();
        let at = RepoKey {
            upstream: "docker.io",
            repo: &repo,
        };
        let tag = Tag::parse("1").unwrap();
        let tag_dir = dir.path().join("meta/docker.io/library/app/_tags/1");
        std::fs::create_dir_all(&tag_dir).unwrap();
        let old = |d: &[u8], t: &str| format!(r#"{{"digest":"{}","media_type":"{t}","size":3}}"#, Digest::of(d));
        std::fs::write(tag_dir.join("0123456789abcdef.json"), old(b"a", "application/x")).unwrap();
        std::fs::write(tag_dir.join("fedcba9876543210.json"), old(b"b", "application/y")).unwrap();
        std::fs::write(tag_dir.join("0000000000000000.json"), b"{cut sho").unwrap();
        let mut got = s.get_tags(at, &tag).await.unwrap();
        got.sort_by(|a, b| a.media_type.cmp(&b.media_type));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].digest, Digest::of(b"a").to_string());
        assert!(got[0].seen_ms > 0, "a record without a time gets its file's");

        let fresh = TagRecord {
            digest: Digest::of(b"c").to_string(),
            media_type: "application/x".into(),
            size: 3,
            public: true,
            seen_ms: 1,
        };
        s.put_tag(at, &tag, &fresh).await.unwrap();
        assert!(!tag_dir.join("0123456789abcdef.json").exists(), "superseded");
        assert!(tag_dir.join("fedcba9876543210.json").exists(), "another type stays");
        let got = s.get_tags(at, &tag).await.unwrap();
        assert!(got.contains(&fresh), "{got:?}");
        assert_eq!(got.len(), 2);
    }

    #[tokio::test]
    async fn tmp_is_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        DiskStore::open_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("tmp/leftover"), b"x").unwrap();
        DiskStore::open_dir(dir.path()).unwrap();
        assert!(!dir.path().join("tmp/leftover").exists());
    }

    #[tokio::test]
    async fn tag_records_under_a_namespace_move_to_the_upstream_name() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("tags/dockerhub/library/alpine/_tags/3");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        let rec = TagRecord {
            digest: Digest::of(b"m").to_string(),
            media_type: "t".into(),
            size: 1,
            public: true,
            seen_ms: 5,
        };
        std::fs::write(old.join("k.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
        let s = DiskStore::open_dir(dir.path()).unwrap();
        s.migrate_namespaces(&[("dockerhub".into(), "docker.io".into())])
            .unwrap();
        let repo = RepoName::parse("library/alpine").unwrap();
        let at = RepoKey {
            upstream: "docker.io",
            repo: &repo,
        };
        assert_eq!(s.get_tags(at, &Tag::parse("3").unwrap()).await.unwrap(), vec![rec]);
        assert_eq!(s.list_repositories("docker.io").await.unwrap(), vec!["library/alpine"]);
        assert!(!dir.path().join("tags").exists());
    }
}
