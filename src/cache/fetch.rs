//! Single-flight fetch: one upstream download per cold digest, streamed to
//! every waiting client while it is written to disk.
//!
//! The first request for a missing digest starts a background task (the
//! leader) that writes the upstream stream into a pending file, hashing it as
//! it goes. Every request for that digest, the first included, reads the
//! pending file as it grows, so a slow client slows nobody else and nothing
//! is buffered in memory. The last byte of any response is released only
//! after the whole download has been verified against its digest and
//! committed: a corrupt or short download reaches clients as a broken
//! transfer, never as a complete one. The leader runs on when clients leave.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::store::{BlobInfo, Store};
use crate::metrics::METRICS;
use crate::reference::Digest;
use crate::registry::errors::RegistryError;

const READ_CHUNK: usize = 256 * 1024;
/// Largest piece the leader buffers before writing it to the pending file.
const WRITE_CHUNK: usize = 1024 * 1024;

/// An upstream body as the cache sees it: bytes and what upstream said of them.
pub struct Source {
    pub media_type: Option<String>,
    pub length: Option<u64>,
    pub body: Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>,
}

pub type OpenFuture = Pin<Box<dyn std::future::Future<Output = Result<Source, RegistryError>> + Send>>;

#[derive(Clone, Debug)]
enum Progress {
    Opening,
    Growing { written: u64 },
    Done { size: u64 },
    Failed(RegistryError),
}

struct Inflight {
    progress: watch::Sender<Progress>,
    pending: OnceLock<PathBuf>,
    /// (media type, length announced by upstream)
    meta: OnceLock<(Option<String>, Option<u64>)>,
}

pub struct Cache<S: Store> {
    store: Arc<S>,
    inflight: Mutex<HashMap<Digest, Arc<Inflight>>>,
}

/// Something a client can be served: its size and type (when known) and a
/// way to stream any byte range of it.
pub struct Served<S: Store> {
    pub info: ServedInfo,
    source: ServedSource<S>,
}

#[derive(Debug, Clone)]
pub struct ServedInfo {
    /// `None` while a download of unannounced length is in progress.
    pub size: Option<u64>,
    pub media_type: Option<String>,
    /// True when the bytes came from the store without any upstream request.
    pub hit: bool,
}

enum ServedSource<S: Store> {
    Stored(S::Reader),
    Growing {
        reader: Option<S::Reader>,
        rx: watch::Receiver<Progress>,
        store: Arc<S>,
        digest: Digest,
    },
}

impl<S: Store> Cache<S> {
    pub fn new(store: Arc<S>) -> Self {
        Cache {
            store,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Serves `digest` from the store, or starts (or joins) the one download
    /// of it. `open` is called only by the leader, at most once per download.
    pub async fn get_or_fetch<F>(self: &Arc<Self>, digest: &Digest, open: F) -> Result<Served<S>, RegistryError>
    where
        F: FnOnce() -> OpenFuture,
    {
        if let Some((reader, info)) = self.store.open(digest).await.map_err(|e| store_error(digest, e))? {
            METRICS.cache_hits.inc();
            return Ok(Served {
                info: ServedInfo {
                    size: Some(info.size),
                    media_type: info.media_type,
                    hit: true,
                },
                source: ServedSource::Stored(reader),
            });
        }
        let (inflight, leader) = {
            let mut map = self
                .inflight
                .lock()
                .map_err(|_| RegistryError::internal("cache lock poisoned"))?;
            match map.get(digest) {
                Some(f) => (f.clone(), false),
                None => {
                    let (tx, _) = watch::channel(Progress::Opening);
                    let f = Arc::new(Inflight {
                        progress: tx,
                        pending: OnceLock::new(),
                        meta: OnceLock::new(),
                    });
                    map.insert(digest.clone(), f.clone());
                    (f, true)
                }
            }
        };
        let rx = inflight.progress.subscribe();
        if leader {
            METRICS.cache_misses.inc();
            let cache = self.clone();
            let digest = digest.clone();
            let opener = open();
            let inflight = inflight.clone();
            tokio::spawn(async move {
                let mut guard = LeaderGuard {
                    cache: &cache,
                    digest: &digest,
                    inflight: &inflight,
                    done: false,
                };
                let result = cache.download(&digest, &inflight, opener).await;
                guard.finish(result);
            });
        } else {
            METRICS.cache_joins.inc();
        }
        self.follow(digest, inflight, rx).await
    }

    /// Waits until the download has started, then attaches to it.
    async fn follow(
        &self,
        digest: &Digest,
        inflight: Arc<Inflight>,
        mut rx: watch::Receiver<Progress>,
    ) -> Result<Served<S>, RegistryError> {
        loop {
            let p = rx.borrow_and_update().clone();
            match p {
                Progress::Opening => {
                    if rx.changed().await.is_err() {
                        return Err(RegistryError::internal(format!("download of {digest} vanished")));
                    }
                }
                Progress::Failed(e) => return Err(e),
                Progress::Done { .. } => {
                    // Finished before we attached: it is in the store now.
                    let (reader, info) = self
                        .store
                        .open(digest)
                        .await
                        .map_err(|e| store_error(digest, e))?
                        .ok_or_else(|| {
                            RegistryError::internal(format!("{digest} vanished from the store after download"))
                        })?;
                    return Ok(Served {
                        info: ServedInfo {
                            size: Some(info.size),
                            media_type: info.media_type,
                            hit: false,
                        },
                        source: ServedSource::Stored(reader),
                    });
                }
                Progress::Growing { .. } => {
                    let (media_type, length) = inflight.meta.get().cloned().unwrap_or((None, None));
                    let reader = match inflight.pending.get() {
                        Some(id) => match self.store.open_pending(id).await {
                            Ok(r) => Some(r),
                            // Committed (renamed) meanwhile: read from the store once Done.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                            Err(e) => return Err(store_error(digest, e)),
                        },
                        None => None,
                    };
                    return Ok(Served {
                        info: ServedInfo {
                            size: length,
                            media_type,
                            hit: false,
                        },
                        source: ServedSource::Growing {
                            reader,
                            rx,
                            store: self.store.clone(),
                            digest: digest.clone(),
                        },
                    });
                }
            }
        }
    }

    /// The leader's work: stream upstream into a pending file, verify, commit.
    async fn download(&self, digest: &Digest, inflight: &Inflight, opener: OpenFuture) -> Result<u64, RegistryError> {
        if let Some(info) = self.store.stat(digest).await.map_err(|e| store_error(digest, e))? {
            // Committed by a download that finished just before ours began.
            return Ok(info.size);
        }
        let Source {
            media_type,
            length,
            mut body,
        } = opener.await?;
        METRICS.upstream_fetches.inc();
        let (mut pending, id) = self.store.begin(digest).await.map_err(|e| store_error(digest, e))?;
        let _ = inflight.pending.set(id.clone());
        let _ = inflight.meta.set((media_type.clone(), length));
        inflight.progress.send_replace(Progress::Growing { written: 0 });

        match write_verified(digest, length, &mut body, &mut pending, inflight).await {
            Ok(size) => {
                if let Err(e) = self.store.commit(pending, &id, digest, media_type.as_deref()).await {
                    return Err(store_error(digest, e));
                }
                METRICS.bytes_fetched.add(size);
                Ok(size)
            }
            Err(e) => {
                self.store.abort(pending, &id).await;
                Err(e)
            }
        }
    }
}

/// Ends a download exactly once: unregisters it, then tells every waiter
/// the outcome. Dropped without `finish` (the task panicked or the runtime
/// is shutting down), it fails the download so no waiter hangs on it.
struct LeaderGuard<'a, S: Store> {
    cache: &'a Cache<S>,
    digest: &'a Digest,
    inflight: &'a Inflight,
    done: bool,
}

impl<S: Store> LeaderGuard<'_, S> {
    fn finish(&mut self, result: Result<u64, RegistryError>) {
        self.done = true;
        match self.cache.inflight.lock() {
            Ok(mut map) => map.remove(self.digest),
            Err(poisoned) => poisoned.into_inner().remove(self.digest),
        };
        let digest = self.digest;
        match result {
            Ok(size) => {
                tracing::debug!(%digest, size, "download verified and stored");
                self.inflight.progress.send_replace(Progress::Done { size });
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "download failed; nothing was stored");
                self.inflight.progress.send_replace(Progress::Failed(e));
            }
        }
    }
}

impl<S: Store> Drop for LeaderGuard<'_, S> {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Err(RegistryError::internal(format!(
                "download of {} was aborted",
                self.digest
            ))));
        }
    }
}

/// Copies `body` into `pending`, publishing progress after every chunk, and
/// checks length and sha256 at the end.
async fn write_verified<W: tokio::io::AsyncWrite + Unpin>(
    digest: &Digest,
    length: Option<u64>,
    body: &mut Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>,
    pending: &mut W,
    inflight: &Inflight,
) -> Result<u64, RegistryError> {
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    let mut buf = BytesMut::new();
    let broken = |why: String| {
        METRICS.verify_failures.inc();
        RegistryError::new(http::StatusCode::BAD_GATEWAY, "UNAVAILABLE", why)
    };
    loop {
        // Write in large pieces while upstream is fast; as soon as it makes
        // us wait, write what we have so waiting clients get it now.
        let next = match body.next().now_or_never() {
            Some(item) => item,
            None => {
                written += flush_to(pending, &mut buf, digest).await?;
                inflight.progress.send_replace(Progress::Growing { written });
                body.next().await
            }
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| broken(format!("download of {digest} broke after {written} bytes: {e}")))?;
        hasher.update(&chunk);
        buf.extend_from_slice(&chunk);
        if length.is_some_and(|l| written + buf.len() as u64 > l) {
            return Err(broken(format!(
                "upstream sent more than the announced {} bytes of {digest}",
                length.unwrap_or(0)
            )));
        }
        if buf.len() >= WRITE_CHUNK {
            written += flush_to(pending, &mut buf, digest).await?;
            inflight.progress.send_replace(Progress::Growing { written });
        }
    }
    written += flush_to(pending, &mut buf, digest).await?;
    if let Some(l) = length {
        if written != l {
            return Err(broken(format!("upstream sent {written} of {l} bytes of {digest}")));
        }
    }
    let got = Digest::from_sha256(&hasher.finalize());
    if &got != digest {
        return Err(broken(format!(
            "upstream content does not match {digest} (got {got}); not stored"
        )));
    }
    Ok(written)
}

/// Writes and flushes `buf` (so readers of the pending file see it), returning its length.
async fn flush_to<W: tokio::io::AsyncWrite + Unpin>(
    pending: &mut W,
    buf: &mut BytesMut,
    digest: &Digest,
) -> Result<u64, RegistryError> {
    if buf.is_empty() {
        return Ok(0);
    }
    pending.write_all(buf).await.map_err(|e| store_error(digest, e))?;
    pending.flush().await.map_err(|e| store_error(digest, e))?;
    let n = buf.len() as u64;
    buf.clear();
    Ok(n)
}

impl<S: Store> Served<S> {
    /// Content opened directly from the store.
    pub fn stored(reader: S::Reader, info: BlobInfo) -> Self {
        Served {
            info: ServedInfo {
                size: Some(info.size),
                media_type: info.media_type,
                hit: true,
            },
            source: ServedSource::Stored(reader),
        }
    }

    /// The bytes `[start, end)` (end `None` = to the end) as a stream.
    pub fn into_stream(self, start: u64, end: Option<u64>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let end = end.or(self.info.size);
        let state = StreamState {
            source: self.source,
            pos: start,
            end,
            seeked: false,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            match st.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), st)),
                Ok(None) => None,
                Err(e) => {
                    st.end = Some(st.pos); // stop after reporting the error
                    Some((Err(e), st))
                }
            }
        })
    }
}

struct StreamState<S: Store> {
    source: ServedSource<S>,
    pos: u64,
    end: Option<u64>,
    seeked: bool,
}

impl<S: Store> StreamState<S> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if self.end.is_some_and(|e| self.pos >= e) {
            return Ok(None);
        }
        loop {
            let limit = match &mut self.source {
                ServedSource::Stored(_) => self.end.unwrap_or(u64::MAX),
                ServedSource::Growing {
                    rx,
                    reader,
                    store,
                    digest,
                } => {
                    let p = rx.borrow_and_update().clone();
                    match p {
                        Progress::Failed(e) => return Err(io::Error::other(e.message)),
                        Progress::Opening => 0,
                        // Hold the last byte back until the download is verified.
                        Progress::Growing { written } => written.saturating_sub(1),
                        Progress::Done { size } => {
                            if reader.is_none() {
                                let (r, _) = store
                                    .open(digest)
                                    .await?
                                    .ok_or_else(|| io::Error::other(format!("{digest} vanished from the store")))?;
                                *reader = Some(r);
                                self.seeked = false;
                            }
                            self.end = Some(self.end.map_or(size, |e| e.min(size)));
                            size
                        }
                    }
                }
            };
            let limit = self.end.map_or(limit, |e| e.min(limit));
            if self.pos < limit {
                let want = (limit - self.pos).min(READ_CHUNK as u64) as usize;
                let pos = self.pos;
                let seeked = self.seeked;
                let reader = match &mut self.source {
                    ServedSource::Stored(r) => r,
                    ServedSource::Growing { reader: Some(r), .. } => r,
                    ServedSource::Growing { reader: None, .. } => {
                        // Not attached to the pending file: wait for Done.
                        if let ServedSource::Growing { rx, .. } = &mut self.source {
                            rx.changed()
                                .await
                                .map_err(|_| io::Error::other("download ended without result"))?;
                        }
                        continue;
                    }
                };
                if !seeked {
                    reader.seek(io::SeekFrom::Start(pos)).await?;
                    self.seeked = true;
                }
                let mut buf = vec![0u8; want];
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "cached content ended early",
                    ));
                }
                buf.truncate(n);
                self.pos += n as u64;
                METRICS.bytes_served.add(n as u64);
                return Ok(Some(Bytes::from(buf)));
            }
            match &mut self.source {
                ServedSource::Stored(_) => return Ok(None),
                ServedSource::Growing { rx, .. } => {
                    if self.end.is_some_and(|e| self.pos >= e) {
                        return Ok(None);
                    }
                    rx.changed()
                        .await
                        .map_err(|_| io::Error::other("download ended without result"))?;
                }
            }
        }
    }
}

/// A store failure as the client sees it (500), logged once here.
pub(crate) fn store_error(digest: &Digest, e: io::Error) -> RegistryError {
    tracing::error!(%digest, error = %e, "cache store failure");
    RegistryError::internal(format!("cache store failure for {digest}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LocalStore;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cache() -> (tempfile::TempDir, Arc<Cache<LocalStore>>) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open_dir(dir.path()).unwrap();
        (dir, Arc::new(Cache::new(Arc::new(store))))
    }

    fn source(data: Vec<u8>) -> OpenFuture {
        Box::pin(async move {
            let len = data.len() as u64;
            let chunks: Vec<io::Result<Bytes>> = data.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            Ok(Source {
                media_type: None,
                length: Some(len),
                body: Box::pin(futures_util::stream::iter(chunks)),
            })
        })
    }

    async fn read_all(s: Served<LocalStore>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut st = Box::pin(s.into_stream(0, None));
        while let Some(c) = st.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn concurrent_misses_open_upstream_once() {
        let (_dir, cache) = cache();
        let data: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        let d = Digest::of(&data);
        let opened = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, d, data, opened) = (cache.clone(), d.clone(), data.clone(), opened.clone());
            tasks.push(tokio::spawn(async move {
                let served = cache
                    .get_or_fetch(&d, move || {
                        opened.fetch_add(1, Ordering::SeqCst);
                        source(data)
                    })
                    .await
                    .unwrap();
                read_all(served).await.unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), data);
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert!(cache.store().stat(&d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_the_digest_are_never_stored_or_completed() {
        let (_dir, cache) = cache();
        let d = Digest::of(b"the real content");
        let served = cache.get_or_fetch(&d, || source(b"something else!!".to_vec())).await;
        // Either the fetch already failed, or the stream breaks before its end.
        if let Ok(s) = served {
            assert!(read_all(s).await.is_err(), "a corrupt download must not complete");
        }
        assert!(cache.store().stat(&d).await.unwrap().is_none());
        let ok = cache
            .get_or_fetch(&d, || source(b"the real content".to_vec()))
            .await
            .unwrap();
        assert_eq!(read_all(ok).await.unwrap(), b"the real content");
    }

    #[tokio::test]
    async fn a_leader_that_dies_fails_its_waiters_instead_of_hanging_them() {
        let (_dir, cache) = cache();
        let d = Digest::of(b"x");
        let r = cache
            .get_or_fetch(&d, || Box::pin(async { panic!("upstream client bug") }))
            .await;
        assert!(r.is_err());
        let ok = cache.get_or_fetch(&d, || source(b"x".to_vec())).await.unwrap();
        assert_eq!(read_all(ok).await.unwrap(), b"x");
    }
}
