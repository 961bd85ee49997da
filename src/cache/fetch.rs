//! Single-flight fetch: one upstream download per cold digest, streamed to
//! every waiting client while it is written to the store.
//!
//! The first request for a missing digest starts a background task (the
//! leader) that writes the upstream stream into a pending blob, hashing it
//! as it goes. Every request for that digest, the first included, follows
//! the pending blob as it grows, so a slow client slows nobody else and
//! nothing is buffered in memory. The last byte of any response is released
//! only after the whole download has been verified against its digest and
//! committed: a corrupt or short download reaches clients as a broken
//! transfer, never as a complete one. The leader runs on when clients leave.
//!
//! A download whose body breaks off (or ends short of its announced length)
//! is resumed: the source is opened again from the first byte not yet
//! written (upstream gets `Range: bytes=N-`, on the same or another URL),
//! and when upstream ignores the range and sends everything again, the
//! bytes already written are skipped. The digest still covers every byte,
//! and followers, reading the pending blob, see no break.
//!
//! When the disk is full (the store cannot take the download: no room for
//! its announced length, or no room at all), nothing is stored: every
//! waiter opens its own upstream stream and is served from it, verified
//! just the same (its last byte held back until the digest matched), and
//! the evictor is told to make room. Pulls go on succeeding; the cache
//! fills again once there is space.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::blob_store::{ByteStream, GrowingBlob, PendingBlob};
use super::error::FetchError;
use super::progress::Progress;
use super::served::{Lookup, Served, ServedInfo};
use super::source::{OpenFuture, Source};
use super::Cache;
use crate::metrics::METRICS;
use crate::reference::Digest;

/// Largest piece the leader buffers before writing it to the pending blob.
const WRITE_CHUNK: usize = 1024 * 1024;
/// Most times one download is resumed after its body broke off.
const MAX_RESUMES: u32 = 20;
/// Resumes in a row that brought no new byte before the download fails.
const MAX_FRUITLESS_RESUMES: u32 = 3;

/// How a leader's download ended when it did not fail.
enum Outcome {
    Stored(u64),
    Uncached,
}

/// True for "the file system is full" (ENOSPC, EDQUOT).
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

pub(crate) struct Inflight {
    progress: watch::Sender<Progress>,
    follower: OnceLock<Arc<dyn GrowingBlob>>,
    /// (media type, length announced by upstream)
    meta: OnceLock<(Option<String>, Option<u64>)>,
    /// The leader's upstream body when the store had no room for it: the
    /// first waiter takes it, so one uncached pull costs one upstream GET.
    spare: std::sync::Mutex<Option<Source>>,
}

impl Cache {
    /// Serves `digest` from the store, or starts (or joins) the one download
    /// of it. `open` is called only by a leader, at most once per download.
    ///
    /// A requester that joined someone else's download and saw its source
    /// fail (that requester's upstream or repository may not have the
    /// digest, or may refuse it) tries again with its own source rather than
    /// hand another client's error on. `open` is called again only when
    /// the disk is full, to stream without storing, and by the leader, from
    /// an offset, to resume a download that broke off.
    pub async fn get_or_fetch<F>(self: &Arc<Self>, digest: &Digest, open: F) -> Result<Served, FetchError>
    where
        F: Fn(u64) -> OpenFuture + Send + Sync + 'static,
    {
        let open = Arc::new(open);
        let mut led_once = false;
        loop {
            if let Some(served) = self.open_stored(digest).await? {
                return Ok(served);
            }
            let (inflight, leader) = self.start_or_join(digest);
            let rx = inflight.progress.subscribe();
            let lookup = if leader || led_once { Lookup::Miss } else { Lookup::Join };
            if leader {
                led_once = true;
                self.spawn_leader(digest, inflight.clone(), open.clone());
            }
            match self.follow(digest, inflight.clone(), rx).await {
                Err(FetchError::Source(e)) if !leader && !led_once => {
                    tracing::debug!(%digest, error = %e, "the download joined failed at its source; trying ours");
                }
                Ok(None) => {
                    let spare = super::lock(&inflight.spare).take();
                    let source = match spare {
                        Some(s) => s,
                        None => open(0).await?,
                    };
                    let mut served = Served::direct(digest.clone(), source);
                    served.info.lookup = lookup;
                    return Ok(served);
                }
                Ok(Some(mut served)) => {
                    served.info.lookup = lookup;
                    return Ok(served);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The download of `digest` in progress, or a new one this caller leads.
    fn start_or_join(&self, digest: &Digest) -> (Arc<Inflight>, bool) {
        let mut map = super::lock(&self.inflight);
        match map.get(digest) {
            Some(f) => (f.clone(), false),
            None => {
                let (tx, _) = watch::channel(Progress::Opening);
                let f = Arc::new(Inflight {
                    progress: tx,
                    follower: OnceLock::new(),
                    meta: OnceLock::new(),
                    spare: std::sync::Mutex::new(None),
                });
                map.insert(digest.clone(), f.clone());
                (f, true)
            }
        }
    }

    /// Runs the download as a task of its own, so it goes on when every
    /// client has left.
    fn spawn_leader<F>(self: &Arc<Self>, digest: &Digest, inflight: Arc<Inflight>, open: Arc<F>)
    where
        F: Fn(u64) -> OpenFuture + Send + Sync + 'static,
    {
        let cache = self.clone();
        let digest = digest.clone();
        tokio::spawn(async move {
            // Counted here, with the guard that uncounts it, so a task that
            // never ran leaves no download counted.
            METRICS.downloads_in_flight.inc();
            // The guard exists before anything that can fail or panic,
            // `open` included, so no waiter is ever left hanging.
            let mut guard = LeaderGuard {
                cache: &cache,
                digest: &digest,
                inflight: &inflight,
                done: false,
            };
            // Waiters queue behind the cap with the leader; nothing is dropped.
            let result = match cache.downloads.clone().acquire_owned().await {
                Ok(_permit) => cache.download(&digest, &inflight, open.as_ref()).await,
                Err(_) => Err(FetchError::Abandoned { digest: digest.clone() }),
            };
            guard.finish(result);
        });
    }

    /// Waits until the download has started, then attaches to it; `None`
    /// when nothing is being stored and the caller must stream for itself.
    async fn follow(
        &self,
        digest: &Digest,
        inflight: Arc<Inflight>,
        mut rx: watch::Receiver<Progress>,
    ) -> Result<Option<Served>, FetchError> {
        loop {
            let p = rx.borrow_and_update().clone();
            match p {
                Progress::Opening => {
                    if rx.changed().await.is_err() {
                        return Err(FetchError::Abandoned { digest: digest.clone() });
                    }
                }
                Progress::Failed(e) => return Err(e),
                Progress::Uncached => return Ok(None),
                Progress::Done { .. } => {
                    // Finished before we attached: it is in the store now.
                    return match self.open_stored(digest).await? {
                        Some(mut s) => {
                            s.info.lookup = Lookup::Miss;
                            Ok(Some(s))
                        }
                        None => Err(FetchError::store(
                            digest,
                            "reopen",
                            std::io::Error::other("vanished from the store right after download"),
                        )),
                    };
                }
                Progress::Growing { .. } => {
                    let (media_type, length) = inflight.meta.get().cloned().unwrap_or((None, None));
                    let Some(reader) = inflight.follower.get().cloned() else {
                        return Err(FetchError::Abandoned { digest: digest.clone() });
                    };
                    let info = ServedInfo {
                        size: length,
                        media_type,
                        lookup: Lookup::Miss,
                    };
                    return Ok(Some(Served::growing(info, reader, rx)));
                }
            }
        }
    }

    /// The leader's work: stream upstream into a pending blob, verify, commit.
    async fn download<F>(&self, digest: &Digest, inflight: &Inflight, open: &F) -> Result<Outcome, FetchError>
    where
        F: Fn(u64) -> OpenFuture,
    {
        if let Some(info) = self.stat(digest).await? {
            // Committed by a download that finished just before ours began.
            return Ok(Outcome::Stored(info.size));
        }
        let source = open(0).await?;
        let public = source.public;
        let (media_type, length, max_len) = (source.media_type.clone(), source.length, source.max_len);
        if let (Some(l), Some(max)) = (length, max_len) {
            if l > max {
                return Err(FetchError::Long {
                    digest: digest.clone(),
                    limit: max,
                });
            }
        }
        let limit = length.or(max_len);
        let begun = if source.stored_by_sender {
            self.blobs.begin_unshared(digest).await
        } else {
            self.blobs.begin(digest).await
        };
        let begun = match begun {
            Ok(mut p) => match length {
                Some(len) => p.reserve(len).await.map(|()| p),
                None => Ok(p),
            },
            Err(e) => Err(e),
        };
        let mut pending = match begun {
            Ok(p) => p,
            Err(e) if is_disk_full(&e) => {
                METRICS.disk_full.inc();
                tracing::warn!(
                    %digest,
                    bytes = length,
                    error = %e,
                    "disk full: serving from upstream without caching; evicting to make room"
                );
                self.disk_full(length.unwrap_or(0));
                *super::lock(&inflight.spare) = Some(source);
                return Ok(Outcome::Uncached);
            }
            Err(e) => return Err(FetchError::store(digest, "begin", e)),
        };
        let mut body = source.body;
        let _ = inflight.follower.set(pending.follower());
        let _ = inflight.meta.set((media_type.clone(), length));
        inflight.progress.send_replace(Progress::Growing { written: 0 });

        let written = match write_verified(digest, length, limit, &mut body, pending.as_mut(), inflight, open).await {
            Ok(n) => n,
            Err(e) => {
                if e.is_bad_content() {
                    METRICS.verify_failures.inc();
                }
                if matches!(e, FetchError::DigestMismatch { .. }) {
                    METRICS.digest_mismatches.inc();
                }
                if let FetchError::Store { source, .. } = &e {
                    if is_disk_full(source) {
                        // Announced no length, so nothing was reserved: this
                        // download breaks, later ones stream uncached.
                        METRICS.disk_full.inc();
                        self.disk_full(limit.unwrap_or(0));
                    }
                }
                pending.abort().await;
                return Err(e);
            }
        };
        if let Err(e) = pending.commit(media_type.as_deref()).await {
            if is_disk_full(&e) {
                METRICS.disk_full.inc();
                self.disk_full(written);
            }
            return Err(FetchError::store(digest, "commit", e));
        }
        if public {
            self.mark_public(digest).await;
        }
        self.added(digest, written, media_type.is_some());
        Ok(Outcome::Stored(written))
    }
}

/// Ends a download exactly once: unregisters it, then tells every waiter
/// the outcome. Dropped without `finish` (the task panicked or the runtime
/// is shutting down), it fails the download so no waiter hangs on it.
struct LeaderGuard<'a> {
    cache: &'a Cache,
    digest: &'a Digest,
    inflight: &'a Inflight,
    done: bool,
}

impl LeaderGuard<'_> {
    fn finish(&mut self, result: Result<Outcome, FetchError>) {
        self.done = true;
        METRICS.downloads_in_flight.dec();
        super::lock(&self.cache.inflight).remove(self.digest);
        let digest = self.digest;
        match result {
            Ok(Outcome::Stored(size)) => {
                tracing::debug!(%digest, size, "download verified and stored");
                self.inflight.progress.send_replace(Progress::Done { size });
            }
            Ok(Outcome::Uncached) => {
                self.inflight.progress.send_replace(Progress::Uncached);
            }
            Err(e) => {
                METRICS.downloads_aborted.inc();
                tracing::warn!(%digest, error = %e, "download failed; nothing was stored");
                self.inflight.progress.send_replace(Progress::Failed(e));
            }
        }
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Err(FetchError::Abandoned {
                digest: self.digest.clone(),
            }));
        }
    }
}

/// Copies `body` into `pending`, publishing progress after every write, and
/// checks length and digest at the end. `limit` is the most bytes accepted.
/// A body that breaks off, or ends before the announced `length`, is
/// reopened with `open` from the first byte not yet received.
///
/// Two stages run side by side: one receives from upstream (decrypting on
/// this task) while the other hashes and writes what was received (on
/// blocking threads, the hash beside the write). Done one after the other,
/// a cold 200 MiB blob kept one core busy and upstream waiting: the hash
/// alone was a third of regmirror's CPU (issue 16's profile).
async fn write_verified<F>(
    digest: &Digest,
    length: Option<u64>,
    limit: Option<u64>,
    body: &mut ByteStream,
    pending: &mut dyn PendingBlob,
    inflight: &Inflight,
    open: &F,
) -> Result<u64, FetchError>
where
    F: Fn(u64) -> OpenFuture,
{
    let (tx, rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH);
    let (recycle, recycled) = tokio::sync::mpsc::unbounded_channel();
    let (received, stored) = tokio::join!(
        receive(digest, length, limit, body, open, tx, recycled),
        hash_and_write(digest, pending, inflight, rx, recycle),
    );
    // A store failure stops the receiving too: it is the cause.
    let (written, got) = stored?;
    let received = received?;
    debug_assert_eq!(received, written);
    if let Some(l) = length {
        if written != l {
            return Err(FetchError::Short {
                digest: digest.clone(),
                got: written,
                expected: l,
            });
        }
    }
    if &got != digest {
        return Err(FetchError::DigestMismatch {
            expected: digest.clone(),
            got,
        });
    }
    Ok(written)
}

/// Chunks received and not yet written, at most: with `WRITE_CHUNK`, the
/// memory one download may hold beyond what the socket buffers.
const PIPELINE_DEPTH: usize = 4;

/// The receiving stage: reads `body` (reopening it where it broke off) and
/// hands it on in pieces of up to `WRITE_CHUNK`. Returns how many bytes it
/// handed on; stops early, with `Ok`, when the writing stage has failed.
async fn receive<F>(
    digest: &Digest,
    length: Option<u64>,
    limit: Option<u64>,
    body: &mut ByteStream,
    open: &F,
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    mut recycled: tokio::sync::mpsc::UnboundedReceiver<BytesMut>,
) -> Result<u64, FetchError>
where
    F: Fn(u64) -> OpenFuture,
{
    let mut received: u64 = 0;
    let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
    // Hands the buffer on; false when the writing stage is gone.
    let mut hand_on = |buf: &mut BytesMut, received: &mut u64| {
        let chunk = std::mem::take(buf).freeze();
        // The next piece goes into a buffer the writing stage is done with,
        // or a new one allocated whole, not grown by doubling. A fresh
        // 1 MiB buffer is fresh pages: their faults were 6% of the CPU a
        // cold blob cost (issue 16's profile).
        *buf = match recycled.try_recv() {
            Ok(mut reused) => {
                reused.clear();
                reused.reserve(WRITE_CHUNK);
                reused
            }
            Err(_) => BytesMut::with_capacity(WRITE_CHUNK),
        };
        *received += chunk.len() as u64;
        let tx = &tx;
        async move { chunk.is_empty() || tx.send(chunk).await.is_ok() }
    };
    // Bytes of the current body already received (upstream ignored a Range).
    let mut skip: u64 = 0;
    let (mut resumes, mut fruitless, mut received_at_resume) = (0u32, 0u32, 0u64);
    loop {
        // Hand on large pieces while upstream is fast; as soon as it makes
        // us wait, hand on what we have so waiting clients get it now.
        let next = match body.next().now_or_never() {
            Some(item) => item,
            None => {
                if !hand_on(&mut buf, &mut received).await {
                    return Ok(received);
                }
                body.next().await
            }
        };
        let broke = match next {
            Some(Ok(mut chunk)) => {
                if skip > 0 {
                    let n = skip.min(chunk.len() as u64);
                    let _ = chunk.split_to(n as usize);
                    skip -= n;
                }
                if let Some(l) = limit {
                    if received + (buf.len() + chunk.len()) as u64 > l {
                        return Err(FetchError::Long {
                            digest: digest.clone(),
                            limit: l,
                        });
                    }
                }
                buf.extend_from_slice(&chunk);
                if buf.len() >= WRITE_CHUNK && !hand_on(&mut buf, &mut received).await {
                    return Ok(received);
                }
                continue;
            }
            Some(Err(e)) => e.to_string(),
            None if length.is_some_and(|l| received + (buf.len() as u64) < l) && skip == 0 => {
                "the body ended before its announced length".to_string()
            }
            None if skip > 0 => "the body ended before the bytes already written".to_string(),
            None => break,
        };
        // Keep what arrived, then ask for the rest.
        if !hand_on(&mut buf, &mut received).await {
            return Ok(received);
        }
        let broken = |message: String| FetchError::Broken {
            digest: digest.clone(),
            after: received,
            message,
        };
        if received > received_at_resume {
            fruitless = 0;
        } else {
            fruitless += 1;
        }
        if resumes >= MAX_RESUMES || fruitless >= MAX_FRUITLESS_RESUMES {
            return Err(broken(format!("{broke} (after {resumes} resumes)")));
        }
        resumes += 1;
        received_at_resume = received;
        tracing::info!(%digest, after = received, error = %broke, "download broke off; resuming");
        let source = open(received)
            .await
            .map_err(|e| broken(format!("{broke}; resuming failed: {e}")))?;
        if source.start == received {
            skip = 0;
        } else if source.start == 0 {
            // Upstream ignored the range: the whole body again.
            skip = received;
        } else {
            return Err(broken(format!(
                "{broke}; resuming from {received} got a body from {}",
                source.start
            )));
        }
        *body = source.body;
    }
    hand_on(&mut buf, &mut received).await;
    Ok(received)
}

/// The writing stage: hashes each piece on a blocking thread while it is
/// written, and publishes the new length once it is. Returns the length
/// and digest of everything written. Pieces nobody else holds any more go
/// back to the receiving stage through `recycle`.
async fn hash_and_write(
    digest: &Digest,
    pending: &mut dyn PendingBlob,
    inflight: &Inflight,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    recycle: tokio::sync::mpsc::UnboundedSender<BytesMut>,
) -> Result<(u64, Digest), FetchError> {
    let mut hasher = digest.hasher();
    let mut written: u64 = 0;
    while let Some(chunk) = rx.recv().await {
        let hashed = {
            let chunk = chunk.clone();
            tokio::task::spawn_blocking(move || {
                hasher.update(&chunk);
                hasher
            })
        };
        let wrote = pending.write(chunk.clone()).await;
        hasher = hashed
            .await
            .map_err(|e| FetchError::store(digest, "hash", std::io::Error::other(e)))?;
        wrote.map_err(|e| FetchError::store(digest, "write", e))?;
        written += chunk.len() as u64;
        inflight.progress.send_replace(Progress::Growing { written });
        if let Ok(buf) = chunk.try_into_mut() {
            let _ = recycle.send(buf);
        }
    }
    Ok((written, hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::SourceError;
    use crate::upstream;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn cache() -> (tempfile::TempDir, Arc<Cache>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::cache::DiskStore::open_dir(dir.path()).unwrap());
        let cache = Cache::new(store.clone(), store, 2);
        (dir, Arc::new(cache))
    }

    fn source(data: Vec<u8>) -> OpenFuture {
        Box::pin(async move { Ok(source_now(data)) })
    }

    fn source_now(data: Vec<u8>) -> Source {
        let len = data.len() as u64;
        let chunks: Vec<io::Result<bytes::Bytes>> = data
            .chunks(1000)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        Source {
            stored_by_sender: false,
            media_type: None,
            length: Some(len),
            max_len: None,
            public: true,
            start: 0,
            body: Box::pin(futures_util::stream::iter(chunks)),
        }
    }

    async fn read_all(s: Served) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut st = Box::pin(s.into_stream(0, None));
        while let Some(c) = st.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    fn inflight_receivers(cache: &Cache, d: &Digest) -> usize {
        cache
            .inflight
            .lock()
            .unwrap()
            .get(d)
            .map_or(0, |f| f.progress.receiver_count())
    }

    #[tokio::test]
    async fn concurrent_misses_open_upstream_once() {
        let (_dir, cache) = cache();
        let data: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        let d = Digest::of(&data);
        let opened = Arc::new(AtomicUsize::new(0));
        // The source does not answer until every requester has joined the
        // one download, so none of them can be served from the store.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, d, data, opened, gate) = (cache.clone(), d.clone(), data.clone(), opened.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let served = cache
                    .get_or_fetch(&d, move |_| {
                        opened.fetch_add(1, Ordering::SeqCst);
                        let (gate, data) = (gate.clone(), data.clone());
                        Box::pin(async move {
                            let _ = gate.acquire().await;
                            Ok(source_now(data))
                        })
                    })
                    .await
                    .unwrap();
                let lookup = served.info.lookup;
                (lookup, read_all(served).await.unwrap())
            }));
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while inflight_receivers(&cache, &d) < 8 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("all 8 requesters join one download");
        gate.add_permits(1);
        let mut lookups = Vec::new();
        for t in tasks {
            let (lookup, got) = t.await.unwrap();
            assert_eq!(got, data);
            lookups.push(lookup);
        }
        // What the request log and cache metrics report: one miss, seven joins.
        assert_eq!(lookups.iter().filter(|l| **l == Lookup::Miss).count(), 1, "{lookups:?}");
        assert_eq!(lookups.iter().filter(|l| **l == Lookup::Join).count(), 7, "{lookups:?}");
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert!(cache.stat(&d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_joiner_whose_leader_could_not_get_the_digest_uses_its_own_source() {
        let (_dir, cache) = cache();
        let data = b"layer that only one repository has".to_vec();
        let d = Digest::of(&data);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (c, dd, g) = (cache.clone(), d.clone(), gate.clone());
        let leader = tokio::spawn(async move {
            c.get_or_fetch(&dd, move |_| {
                let g = g.clone();
                Box::pin(async move {
                    let _ = g.acquire().await;
                    Err(SourceError::new(upstream::Error::Status {
                        upstream: "u".into(),
                        status: http::StatusCode::NOT_FOUND,
                        body: None,
                        retry_after: None,
                        challenge: None,
                    }))
                })
            })
            .await
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while inflight_receivers(&cache, &d) < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let (c, dd) = (cache.clone(), d.clone());
        let joiner = tokio::spawn(async move {
            let served = c.get_or_fetch(&dd, move |_| source(data.clone())).await?;
            Ok::<_, FetchError>(read_all(served).await.unwrap())
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while inflight_receivers(&cache, &d) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the second requester joins the first download");
        gate.add_permits(1);
        let led = leader.await.unwrap();
        assert!(
            matches!(led, Err(FetchError::Source(e)) if e.downcast_ref::<upstream::Error>().is_some_and(|u| u.is_not_found()))
        );
        assert_eq!(
            joiner
                .await
                .unwrap()
                .expect("the joiner is not handed the leader's 404"),
            b"layer that only one repository has"
        );
    }

    #[tokio::test]
    async fn downloads_beyond_the_cap_wait_for_a_free_slot_and_none_is_dropped() {
        let (_dir, cache) = cache(); // a cap of 2
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let opened = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 10];
            let d = Digest::of(&data);
            let (c, g, o) = (cache.clone(), gate.clone(), opened.clone());
            tasks.push(tokio::spawn(async move {
                let served = c
                    .get_or_fetch(&d, move |_| {
                        o.fetch_add(1, Ordering::SeqCst);
                        let (g, data) = (g.clone(), data.clone());
                        Box::pin(async move {
                            let _ = g.acquire().await.map(|p| p.forget());
                            Ok(source_now(data))
                        })
                    })
                    .await
                    .unwrap();
                read_all(served).await.unwrap()
            }));
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while opened.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(opened.load(Ordering::SeqCst), 2, "a third download waits for a slot");
        gate.add_permits(3);
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), vec![i as u8; 10]);
        }
        assert_eq!(opened.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_the_digest_are_never_stored_or_completed() {
        let (_dir, cache) = cache();
        let d = Digest::of(b"the real content");
        let served = cache.get_or_fetch(&d, |_| source(b"something else!!".to_vec())).await;
        // Either the fetch already failed, or the stream breaks before its end.
        if let Ok(s) = served {
            assert!(read_all(s).await.is_err(), "a corrupt download must not complete");
        }
        assert!(cache.stat(&d).await.unwrap().is_none());
        let ok = cache
            .get_or_fetch(&d, |_| source(b"the real content".to_vec()))
            .await
            .unwrap();
        assert_eq!(read_all(ok).await.unwrap(), b"the real content");
    }

    #[tokio::test]
    async fn more_than_the_limit_is_refused_even_when_unannounced() {
        let (_dir, cache) = cache();
        let data = vec![7u8; 10_000];
        let d = Digest::of(&data);
        let served = cache
            .get_or_fetch(&d, move |_| {
                let data = data.clone();
                Box::pin(async move {
                    let mut s = source_now(data);
                    s.length = None;
                    s.max_len = Some(4096);
                    Ok(s)
                })
            })
            .await;
        let failed = match served {
            Err(e) => matches!(e, FetchError::Long { .. }),
            Ok(s) => read_all(s).await.is_err(),
        };
        assert!(failed, "a body past its limit never completes");
        assert!(cache.stat(&d).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_leader_that_dies_fails_its_waiters_instead_of_hanging_them() {
        let (_dir, cache) = cache();
        let d = Digest::of(b"x");
        let r = cache
            .get_or_fetch(&d, |_| Box::pin(async { panic!("upstream client bug") }))
            .await;
        assert!(r.is_err());
        let r = cache.get_or_fetch(&d, |_| panic!("opener bug")).await;
        assert!(r.is_err(), "a source that panics while being opened fails too");
        let ok = cache.get_or_fetch(&d, |_| source(b"x".to_vec())).await.unwrap();
        assert_eq!(read_all(ok).await.unwrap(), b"x");
    }
}
