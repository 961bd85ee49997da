//! `regmirror cache …`: the operator's commands on a store, safe while
//! `serve` runs on it.
//!
//! On the disk backend they open the store without clearing anything
//! (`DiskStore::attach`) and the recency index in redb's multi-writer mode,
//! so `serve` keeps serving and sees their changes (totals, removals) on
//! its next pass. On the S3 backend they work on the bucket itself, which
//! every replica reads: what they delete is gone for all (a replica's local
//! read cache may keep serving its copy until it evicts it).
//! Deleting under `serve` is as safe as eviction: what a client has open
//! stays readable. `warm` goes through the running server's plain
//! listener, so it fills the cache by the normal fetch path (single
//! flight, verification, access rules) and never writes the store itself.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use regmirror::cache::blob_store::BlobStore;
use regmirror::cache::bucket_evict;
use regmirror::cache::evict::{evict_to, now_ms};
use regmirror::cache::index::{Change, Class, Index};
use regmirror::cache::listing::{cached_tags, closure, CachedTag, Usage};
use regmirror::cache::s3::S3Store;
use regmirror::cache::{DiskStore, HostedStore, MetaStore, RepoKey, INDEX_FILE};
use regmirror::config::{format_size as human, parse_image, parse_size, Platforms, Settings};
use regmirror::reference::{Digest, Tag};
use regmirror::warm::{warm_image, Answer, Get, Progress, Puller};

type Res<T> = Result<T, String>;

struct Store {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    hosted: Arc<dyn HostedStore>,
    /// The disk backend's recency index; `None` on the S3 backend.
    index: Option<Arc<Index>>,
    /// The S3 backend's bucket.
    bucket: Option<Arc<S3Store>>,
}

fn open(s: &Settings) -> Res<Store> {
    if let Some(b) = &s.bucket {
        let bucket = Arc::new(S3Store::connect(b).map_err(|e| format!("cache.bucket: {e}"))?);
        return Ok(Store {
            blobs: bucket.clone(),
            meta: bucket.clone(),
            hosted: bucket.clone(),
            index: None,
            bucket: Some(bucket),
        });
    }
    let disk = Arc::new(DiskStore::attach(&s.cache_dir).map_err(|e| format!("cache.dir: {e}"))?);
    let (index, _) = Index::open(&s.cache_dir.join(INDEX_FILE)).map_err(|e| format!("cache index: {e}"))?;
    Ok(Store {
        blobs: disk.clone(),
        meta: disk.clone(),
        hosted: disk,
        index: Some(Arc::new(index)),
        bucket: None,
    })
}

/// Every digest a local namespace's repository holds: never evicted,
/// removed only by the local collection in `gc`.
async fn held(s: &Settings, store: &Store) -> Res<std::collections::HashSet<Digest>> {
    let namespaces: Vec<String> = s.locals.iter().map(|l| l.namespace.clone()).collect();
    regmirror::local::gc::held(store.hosted.as_ref(), &namespaces)
        .await
        .map_err(|e| format!("local namespaces: {e}"))
}

/// The digests the recency index holds: the cache's own content.
fn indexed_digests(index: &Index) -> Res<std::collections::HashSet<String>> {
    Ok(index
        .all()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|e| e.digest)
        .collect())
}

fn rt() -> Res<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}

fn progress(len: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})") {
        pb.set_style(style);
    }
    pb.set_message(what.to_string());
    Some(pb)
}

// ---------------------------------------------------------------- du

pub fn du(s: &Settings) -> Res<()> {
    let store = open(s)?;
    let runtime = rt()?;
    let (total, blobs, manifests) = match (&store.index, &store.bucket) {
        (Some(index), _) => {
            let all = index.all().map_err(|e| e.to_string())?;
            let manifests = all.iter().filter(|e| e.class == Class::Manifest).count();
            (all.iter().map(|e| e.size).sum::<u64>(), all.len(), manifests)
        }
        (None, Some(bucket)) => {
            let all = runtime
                .block_on(bucket_evict::usage(bucket))
                .map_err(|e| e.to_string())?;
            let manifests = all.iter().filter(|e| e.manifest).count();
            (all.iter().map(|e| e.size).sum::<u64>(), all.len(), manifests)
        }
        (None, None) => return Err("no store".into()),
    };
    let bound = match (&store.bucket, s.bucket.as_ref().and_then(|b| b.max_size)) {
        (None, _) => format!("max_size {}, evicts down to {}", human(s.max_size), human(s.low_water)),
        (Some(b), Some(max)) => format!(
            "{}: bucket_max_size {}, evicts down to {}",
            b.label(),
            human(max),
            human(max / 10 * 9)
        ),
        (Some(b), None) => format!("{}: no bucket_max_size", b.label()),
    };
    println!(
        "{} in {} blobs ({} layers and configs, {} manifests); {bound}",
        human(total),
        blobs,
        blobs - manifests,
        manifests,
    );
    println!("total_bytes {total}");
    if !s.locals.is_empty() {
        let local = runtime.block_on(async {
            let held = held(s, &store).await?;
            let mut bytes = 0;
            for d in &held {
                if let Ok(Some(info)) = store.blobs.stat(d).await {
                    bytes += info.size;
                }
            }
            Ok::<_, String>((held.len(), bytes))
        })?;
        println!(
            "local namespaces: {} in {} blobs (pushed content, outside max_size)",
            human(local.1),
            local.0
        );
        println!("local_bytes {}", local.1);
    }
    Ok(())
}

// ---------------------------------------------------------------- gc

pub fn gc(s: &Settings, to: Option<&str>) -> Res<()> {
    let target = match to {
        Some(t) => Some(parse_size(t).or_else(|e| if t.trim() == "0" { Ok(0) } else { Err(e) })?),
        None => None,
    };
    let store = open(s)?;
    let runtime = rt()?;
    let keep = runtime.block_on(held(s, &store))?;
    let done = match (&store.index, &store.bucket) {
        (Some(index), _) => {
            let target = target.unwrap_or(s.low_water);
            let keep: std::collections::HashSet<String> = keep.iter().map(|d| d.to_string()).collect();
            runtime
                .block_on(evict_to(
                    index,
                    store.blobs.as_ref(),
                    target,
                    &|d| keep.contains(d),
                    true,
                ))
                .map(|e| (e.blobs, e.bytes, e.before, e.after))
                .map_err(|e| e.to_string())?
        }
        (None, Some(bucket)) => {
            let target = match (target, s.bucket.as_ref().and_then(|b| b.max_size)) {
                (Some(t), _) => t,
                (None, Some(max)) => max / 10 * 9,
                (None, None) => {
                    return Err("the bucket has no cache.bucket_max_size: say how far with --to SIZE".into())
                }
            };
            let entries = runtime
                .block_on(bucket_evict::usage(bucket))
                .map_err(|e| e.to_string())?;
            let e = runtime.block_on(bucket_evict::evict_bucket(
                entries,
                target,
                &|d| keep.contains(d),
                |d| {
                    let bucket = bucket.clone();
                    async move { bucket.delete_blob(&d).await }
                },
            ));
            (e.blobs, e.bytes, e.before, e.after)
        }
        (None, None) => return Err("no store".into()),
    };
    println!(
        "evicted {} blobs ({}); store {} -> {}",
        done.0,
        human(done.1),
        human(done.2),
        human(done.3)
    );
    if !s.locals.is_empty() {
        let namespaces: Vec<String> = s.locals.iter().map(|l| l.namespace.clone()).collect();
        // What the cache holds besides the pushes keeps its content when a
        // repository lets go of it. In the bucket pulled and pushed content
        // are one: unlinked content stays, under the bucket's bound.
        let cached = match &store.index {
            Some(index) => Some(indexed_digests(index)?),
            None => None,
        };
        let collected = runtime
            .block_on(regmirror::local::gc::collect(
                store.hosted.as_ref(),
                store.blobs.as_ref(),
                &namespaces,
                regmirror::local::gc::GC_GRACE,
                &|d| cached.as_ref().is_none_or(|c| c.contains(d.as_str())),
            ))
            .map_err(|e| format!("local namespaces: {e}"))?;
        println!(
            "local namespaces: {} unreferenced blob links removed, {} blobs deleted ({})",
            collected.unlinked,
            collected.deleted,
            human(collected.bytes)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- verify

/// Re-hashes every stored blob. A mismatch is moved to `quarantine/` (out
/// of the store, kept for a look) and dropped from the index; blobs the
/// index missed (a crash between commit and index write) are indexed, and
/// index entries whose file is gone are dropped. Non-zero exit on any
/// mismatch.
pub fn verify(s: &Settings) -> Res<()> {
    let store = open(s)?;
    match (&store.index, &store.bucket) {
        (Some(index), _) => rt()?.block_on(verify_async(s, &store, index, &s.cache_dir)),
        (None, Some(bucket)) => rt()?.block_on(verify_bucket(bucket)),
        (None, None) => Err("no store".into()),
    }
}

/// Re-hashes every blob in the bucket as it streams; a mismatch is copied
/// to `quarantine/` in the bucket and deleted, so the next pull through
/// any replica fetches it again.
async fn verify_bucket(bucket: &S3Store) -> Res<()> {
    use futures_util::StreamExt;
    use regmirror::cache::blob_store::StoredBlob;
    let listed = bucket.list_blobs().await.map_err(|e| e.to_string())?;
    let bar = progress(listed.len() as u64, "verifying");
    let mut bad = 0;
    for (i, b) in listed.iter().enumerate() {
        let checked = async {
            let Some(blob) = bucket.open_blob(&b.digest).await? else {
                return Ok(None);
            };
            let size = blob.info().size;
            let mut stream = Box::new(blob).read(0, size);
            let mut h = b.digest.hasher();
            while let Some(chunk) = stream.next().await {
                let chunk: bytes::Bytes = chunk?;
                h.update(&chunk);
            }
            Ok::<_, std::io::Error>(Some(h.finish() == b.digest))
        };
        match checked.await {
            Ok(Some(true)) | Ok(None) => {}
            Ok(Some(false)) => {
                let to = bucket
                    .quarantine(&b.digest, now_ms())
                    .await
                    .map_err(|e| format!("{}: {e}", b.digest))?;
                let line = format!("MISMATCH {} quarantined to {to}", b.digest);
                match &bar {
                    Some(pb) => pb.println(&line),
                    None => println!("{line}"),
                }
                bad += 1;
            }
            Err(e) => eprintln!("could not read {}: {e}", b.digest),
        }
        if let Some(pb) = &bar {
            pb.set_position(i as u64 + 1);
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    println!("verified {} blobs: {} mismatched", listed.len(), bad);
    if bad == 0 {
        Ok(())
    } else {
        Err(format!("{bad} blob(s) did not match their digest and were quarantined"))
    }
}

async fn verify_async(s: &Settings, store: &Store, index: &Arc<Index>, root: &Path) -> Res<()> {
    let held = held(s, store).await?;
    let listed = store.blobs.list().await.map_err(|e| e.to_string())?;
    let bar = progress(listed.len() as u64, "verifying");
    let mut bad = Vec::new();
    let mut changes = Vec::new();
    let indexed = indexed_digests(index)?;
    let mut present = std::collections::HashSet::new();
    for (i, b) in listed.iter().enumerate() {
        let path = blob_file(root, &b.digest);
        let d = b.digest.clone();
        let ok = tokio::task::spawn_blocking(move || hash_file(&path, &d))
            .await
            .map_err(|e| e.to_string())?;
        match ok {
            Ok(true) => {
                present.insert(b.digest.to_string());
                if !indexed.contains(&b.digest.to_string()) && !held.contains(&b.digest) {
                    changes.push(Change::Add {
                        digest: b.digest.to_string(),
                        size: b.size,
                        class: if b.manifest { Class::Manifest } else { Class::Layer },
                        at_ms: b.modified_ms,
                    });
                }
            }
            Ok(false) => {
                let q = root.join("quarantine");
                std::fs::create_dir_all(&q).map_err(|e| e.to_string())?;
                let dest = q.join(format!("{}-{}", b.digest.hex(), now_ms()));
                std::fs::rename(blob_file(root, &b.digest), &dest).map_err(|e| e.to_string())?;
                let _ = store.blobs.delete(&b.digest).await;
                changes.push(Change::Remove {
                    digest: b.digest.to_string(),
                });
                let line = format!("MISMATCH {} quarantined to {}", b.digest, dest.display());
                match &bar {
                    Some(pb) => pb.println(&line),
                    None => println!("{line}"),
                }
                bad.push(b.digest.to_string());
            }
            Err(e) => eprintln!("could not read {}: {e}", b.digest),
        }
        if let Some(pb) = &bar {
            pb.set_position(i as u64 + 1);
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    for d in indexed.difference(&present) {
        if !bad.contains(d) {
            changes.push(Change::Remove { digest: d.clone() });
        }
    }
    let index = index.clone();
    tokio::task::spawn_blocking(move || index.apply(&changes))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    println!("verified {} blobs: {} mismatched", listed.len(), bad.len());
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} blob(s) did not match their digest and were quarantined",
            bad.len()
        ))
    }
}

fn blob_file(root: &Path, d: &Digest) -> std::path::PathBuf {
    root.join("blobs")
        .join(d.algorithm().name())
        .join(&d.hex()[..2])
        .join(d.hex())
}

fn hash_file(path: &Path, d: &Digest) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = d.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(&h.finish() == d)
}

// ---------------------------------------------------------------- images

// ---------------------------------------------------------------- ls

pub fn ls(s: &Settings, json: bool) -> Res<()> {
    let store = open(s)?;
    let (mut rows, local) =
        rt()?.block_on(async { Ok::<_, String>((ls_async(s, &store).await?, ls_local(s, &store).await?)) })?;
    rows.extend(local);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!(
        "{:<40} {:<16} {:>10}  {:<20} DIGEST",
        "IMAGE", "TAG", "SIZE", "LAST USED"
    );
    for r in rows {
        let last = if r.last_used_ms == 0 {
            "-".to_string()
        } else {
            let ago = now_ms().saturating_sub(r.last_used_ms) / 1000;
            format!("{}s ago", ago)
        };
        println!(
            "{:<40} {:<16} {:>10}  {:<20} {}",
            format!("{}/{}", r.upstream, r.repository),
            r.tag,
            human(r.size),
            last,
            r.digest
        );
    }
    Ok(())
}

/// The tags of the local namespaces' repositories, as `local/<repo>` rows
/// (pushed, so never "used": their last use is left at 0).
async fn ls_local(s: &Settings, store: &Store) -> Res<Vec<CachedTag>> {
    let mut rows = Vec::new();
    for ns in &s.locals {
        let repos = store
            .hosted
            .repositories(&ns.namespace)
            .await
            .map_err(|e| e.to_string())?;
        for repo in repos {
            for (tag, d) in store.hosted.tags(&repo).await.map_err(|e| e.to_string())? {
                let mut size = 0;
                let mut media_type = String::new();
                for part in closure(store.blobs.as_ref(), &d).await {
                    if let Ok(Some(info)) = store.blobs.stat(&part).await {
                        size += info.size;
                        if part == d {
                            media_type = info.media_type.unwrap_or_default();
                        }
                    }
                }
                rows.push(CachedTag {
                    upstream: "local".into(),
                    repository: repo.to_string(),
                    tag: tag.as_str().to_string(),
                    digest: d.to_string(),
                    media_type,
                    size,
                    last_used_ms: 0,
                });
            }
        }
    }
    Ok(rows)
}

async fn ls_async(s: &Settings, store: &Store) -> Res<Vec<CachedTag>> {
    let names: Vec<String> = s.upstreams.iter().map(|u| u.name.clone()).collect();
    // On the bucket: sizes and last uses (the replicas' `used/` markers)
    // from two listings of it, as its evictor sees them.
    let listed = match &store.bucket {
        Some(bucket) => Some(
            regmirror::cache::bucket_evict::usage(bucket)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|e| (e.digest.to_string(), (e.size, e.last_use_ms)))
                .collect::<std::collections::HashMap<_, _>>(),
        ),
        None => None,
    };
    let usage = match (&listed, store.index.as_deref()) {
        (Some(map), _) => Usage::Listed(map),
        (None, Some(index)) => Usage::Index(index),
        (None, None) => Usage::Unknown,
    };
    cached_tags(store.blobs.as_ref(), store.meta.as_ref(), usage, &names)
        .await
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------- rm

/// Forgets a tag (every media type recorded) and deletes its manifests and
/// the blobs they name, except what another recorded tag still reaches.
pub fn rm(s: &Settings, image: &str) -> Res<()> {
    let img = parse_image(&s.upstreams, image)?;
    let store = open(s)?;
    rt()?.block_on(async {
        let u = &s.upstreams[img.upstream];
        let at = RepoKey {
            upstream: &u.name,
            repo: &img.repo,
        };
        let mut roots = Vec::new();
        match Tag::parse(&img.reference) {
            Ok(tag) if Digest::parse(&img.reference).is_err() => {
                for rec in store.meta.get_tags(at, &tag).await.map_err(|e| e.to_string())? {
                    roots.extend(Digest::parse(&rec.digest).ok());
                }
                store.meta.delete_tag(at, &tag).await.map_err(|e| e.to_string())?;
            }
            _ => roots.extend(Digest::parse(&img.reference).ok()),
        }
        if roots.is_empty() {
            return Err(format!("{image}: nothing cached"));
        }
        let mut doomed = Vec::new();
        for r in &roots {
            for d in closure(store.blobs.as_ref(), r).await {
                if !doomed.contains(&d) {
                    doomed.push(d);
                }
            }
        }
        // Keep what a local namespace holds, and what any other recorded
        // tag reaches.
        let held = held(s, &store).await?;
        doomed.retain(|d| !held.contains(d));
        let others = ls_async(s, &store).await?;
        for row in others {
            if let Ok(d) = Digest::parse(&row.digest) {
                for keep in closure(store.blobs.as_ref(), &d).await {
                    doomed.retain(|x| x != &keep);
                }
            }
        }
        let mut changes = Vec::new();
        let mut bytes = 0;
        for d in &doomed {
            if let Ok(Some(info)) = store.blobs.stat(d).await {
                bytes += info.size;
            }
            store.blobs.delete(d).await.map_err(|e| e.to_string())?;
            changes.push(Change::Remove { digest: d.to_string() });
        }
        if let Some(index) = &store.index {
            index.apply(&changes).map_err(|e| e.to_string())?;
        }
        println!("removed {image}: {} blobs ({})", doomed.len(), human(bytes));
        Ok(())
    })
}

// ---------------------------------------------------------------- warm

/// Pulls images through the running server's plain listener, so they are
/// fetched, verified and stored exactly as a client's pull would be (the
/// same run as a `[[warm]]` schedule's, over HTTP).
pub fn warm(s: &Settings, images: &[String], platform: Option<&str>) -> Res<()> {
    let addr = s
        .http
        .ok_or("cache warm pulls through server.http, which is not configured")?;
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };
    let platform = platform.map(str::to_string).unwrap_or_else(|| {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        format!("linux/{arch}")
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let puller = OverHttp { client, host };
    let platforms = Platforms::Only(vec![platform]);
    rt()?.block_on(async {
        for image in images {
            let bar = Bar(progress(0, image));
            if let Some(pb) = &bar.0 {
                pb.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
            let warmed = warm_image(&puller, &s.upstreams, image, &platforms, &bar).await?;
            if let Some(pb) = bar.0 {
                pb.finish_and_clear();
            }
            println!("warmed {image}: {} blobs ({})", warmed.blobs, human(warmed.bytes));
        }
        Ok(())
    })
}

/// The running server, over its plain listener.
struct OverHttp {
    client: reqwest::Client,
    host: String,
}

#[async_trait::async_trait]
impl Puller for OverHttp {
    async fn get(&self, get: Get<'_>) -> Result<Box<dyn Answer>, String> {
        let url = format!("http://{}{}", self.host, get.path);
        let mut rb = self.client.get(&url);
        if let Some(a) = get.accept {
            rb = rb.header("accept", a);
        }
        if let Some(t) = get.token {
            rb = rb.bearer_auth(t);
        }
        if get.fresh {
            rb = rb.header("cache-control", "no-cache");
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| format!("{url}: {e} (is regmirror serve running?)"))?;
        Ok(Box::new(HttpAnswer(resp)))
    }
}

struct HttpAnswer(reqwest::Response);

#[async_trait::async_trait]
impl Answer for HttpAnswer {
    fn status(&self) -> u16 {
        self.0.status().as_u16()
    }

    fn warning(&self) -> Option<String> {
        let w = self.0.headers().get("warning")?;
        w.to_str().ok().map(str::to_string)
    }

    async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, String> {
        let url = self.0.url().to_string();
        self.0.chunk().await.map_err(|e| format!("{url}: {e}"))
    }
}

/// The progress bar, on a terminal.
struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn total(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.set_length(bytes);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(bytes);
        }
    }
}
