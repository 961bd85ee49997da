//! `regmirror cache …`: the operator's commands on a store, safe while
//! `serve` runs on it.
//!
//! They open the store without clearing anything (`DiskStore::attach`)
//! and the recency index in redb's multi-writer mode, so `serve` keeps
//! serving and sees their changes (totals, removals) on its next pass.
//! Deleting under `serve` is as safe as eviction: what a client has open
//! stays readable. `warm` goes through the running server's plain
//! listener, so it fills the cache by the normal fetch path (single
//! flight, verification, access rules) and never writes the store itself.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use regmirror::cache::blob_store::BlobStore;
use regmirror::cache::evict::{evict_to, now_ms};
use regmirror::cache::index::{Change, Class, Index};
use regmirror::cache::listing::{cached_tags, closure, CachedTag};
use regmirror::cache::{DiskStore, MetaStore, RepoKey, INDEX_FILE};
use regmirror::config::{format_size as human, parse_image, parse_size, Platforms, Settings};
use regmirror::reference::{Digest, Tag};
use regmirror::warm::{warm_image, Answer, Get, Progress, Puller};

type Res<T> = Result<T, String>;

struct Store {
    disk: Arc<DiskStore>,
    index: Arc<Index>,
}

fn open(s: &Settings) -> Res<Store> {
    if let Some(b) = &s.bucket {
        // The bucket's commands need a bucket-wide index (issue 29's next
        // step): refused rather than run on this replica's read cache only,
        // which would report, verify or evict the wrong content.
        return Err(format!(
            "cache.backend = \"s3\" (bucket {}): ls, du, verify, gc and rm work on the disk backend only so far; \
             `cache warm` works",
            b.bucket
        ));
    }
    let disk = DiskStore::attach(&s.cache_dir).map_err(|e| format!("cache.dir: {e}"))?;
    let (index, _) = Index::open(&s.cache_dir.join(INDEX_FILE)).map_err(|e| format!("cache index: {e}"))?;
    Ok(Store {
        disk: Arc::new(disk),
        index: Arc::new(index),
    })
}

/// Every digest a local namespace's repository holds: never evicted,
/// removed only by the local collection in `gc`.
async fn held(s: &Settings, store: &Store) -> Res<std::collections::HashSet<Digest>> {
    let namespaces: Vec<String> = s.locals.iter().map(|l| l.namespace.clone()).collect();
    regmirror::local::gc::held(store.disk.as_ref(), &namespaces)
        .await
        .map_err(|e| format!("local namespaces: {e}"))
}

/// The digests the recency index holds: the cache's own content.
fn indexed_digests(store: &Store) -> Res<std::collections::HashSet<String>> {
    Ok(store
        .index
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
    let all = store.index.all().map_err(|e| e.to_string())?;
    let total: u64 = all.iter().map(|e| e.size).sum();
    let manifests = all.iter().filter(|e| e.class == Class::Manifest).count();
    println!(
        "{} in {} blobs ({} layers and configs, {} manifests); max_size {}, evicts down to {}",
        human(total),
        all.len(),
        all.len() - manifests,
        manifests,
        human(s.max_size),
        human(s.low_water)
    );
    println!("total_bytes {total}");
    if !s.locals.is_empty() {
        let local = rt()?.block_on(async {
            let held = held(s, &store).await?;
            let mut bytes = 0;
            for d in &held {
                if let Ok(Some(info)) = store.disk.stat(d).await {
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
        Some(t) => parse_size(t).or_else(|e| if t.trim() == "0" { Ok(0) } else { Err(e) })?,
        None => s.low_water,
    };
    let store = open(s)?;
    let runtime = rt()?;
    let keep = runtime.block_on(held(s, &store))?;
    let keep: std::collections::HashSet<String> = keep.iter().map(|d| d.to_string()).collect();
    let done = runtime
        .block_on(evict_to(&store.index, store.disk.as_ref(), target, &|d| {
            keep.contains(d)
        }))
        .map_err(|e| e.to_string())?;
    println!(
        "evicted {} blobs ({}); store {} -> {}",
        done.blobs,
        human(done.bytes),
        human(done.before),
        human(done.after)
    );
    if !s.locals.is_empty() {
        let namespaces: Vec<String> = s.locals.iter().map(|l| l.namespace.clone()).collect();
        let cached = indexed_digests(&store)?;
        let collected = runtime
            .block_on(regmirror::local::gc::collect(
                store.disk.as_ref(),
                store.disk.as_ref(),
                &namespaces,
                regmirror::local::gc::GC_GRACE,
                &|d| cached.contains(d.as_str()),
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
    rt()?.block_on(verify_async(s, &store, &s.cache_dir))
}

async fn verify_async(s: &Settings, store: &Store, root: &Path) -> Res<()> {
    let held = held(s, store).await?;
    let listed = store.disk.list().await.map_err(|e| e.to_string())?;
    let bar = progress(listed.len() as u64, "verifying");
    let mut bad = Vec::new();
    let mut changes = Vec::new();
    let indexed = indexed_digests(store)?;
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
                let _ = store.disk.delete(&b.digest).await;
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
    let index = store.index.clone();
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
    use regmirror::cache::HostedStore;
    let mut rows = Vec::new();
    for ns in &s.locals {
        let repos = store
            .disk
            .repositories(&ns.namespace)
            .await
            .map_err(|e| e.to_string())?;
        for repo in repos {
            for (tag, d) in store.disk.tags(&repo).await.map_err(|e| e.to_string())? {
                let mut size = 0;
                let mut media_type = String::new();
                for part in closure(store.disk.as_ref(), &d).await {
                    if let Ok(Some(info)) = store.disk.stat(&part).await {
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
    let local = store.disk.as_ref();
    cached_tags(local, local, Some(&store.index), &names)
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
                for rec in store.disk.get_tags(at, &tag).await.map_err(|e| e.to_string())? {
                    roots.extend(Digest::parse(&rec.digest).ok());
                }
                store.disk.delete_tag(at, &tag).await.map_err(|e| e.to_string())?;
            }
            _ => roots.extend(Digest::parse(&img.reference).ok()),
        }
        if roots.is_empty() {
            return Err(format!("{image}: nothing cached"));
        }
        let mut doomed = Vec::new();
        for r in &roots {
            for d in closure(store.disk.as_ref(), r).await {
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
                for keep in closure(store.disk.as_ref(), &d).await {
                    doomed.retain(|x| x != &keep);
                }
            }
        }
        let mut changes = Vec::new();
        let mut bytes = 0;
        for d in &doomed {
            if let Ok(Some(info)) = store.disk.stat(d).await {
                bytes += info.size;
            }
            store.disk.delete(d).await.map_err(|e| e.to_string())?;
            changes.push(Change::Remove { digest: d.to_string() });
        }
        store.index.apply(&changes).map_err(|e| e.to_string())?;
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
