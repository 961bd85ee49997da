//! What a client is served from the cache: stored content, or a download
//! in progress followed as it grows. Either way a byte range of it comes
//! out as a stream, and a download's last byte only once it is verified.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::blob_store::{ByteStream, GrowingBlob, StoredBlob};
use super::disk::READ_CHUNK;
use super::progress::Progress;
use super::source::Source;
use crate::metrics::METRICS;
use crate::reference::Digest;

pub struct Served {
    pub info: ServedInfo,
    source: ServedSource,
}

#[derive(Debug, Clone)]
pub struct ServedInfo {
    /// `None` while a download of unannounced length is in progress.
    pub size: Option<u64>,
    pub media_type: Option<String>,
    /// How the cache found the content.
    pub lookup: Lookup,
}

/// How a request's content was found: what the request log and the cache
/// metrics report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// In the store (or in memory): no upstream request.
    Hit,
    /// Missing: this request started the download (or streamed it itself).
    Miss,
    /// Missing, and another request's download was already running.
    Join,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Join => "join",
        }
    }
}

/// Counts a response streaming from a download in progress for as long
/// as it lives (the `download_waiters` gauge).
struct Waiter;

impl Waiter {
    fn new() -> Self {
        METRICS.download_waiters.inc();
        Waiter
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        METRICS.download_waiters.dec();
    }
}

enum ServedSource {
    Stored(Box<dyn StoredBlob>),
    /// Held in memory (a hot manifest).
    Memory(Bytes),
    Growing {
        reader: Arc<dyn GrowingBlob>,
        rx: watch::Receiver<Progress>,
        waiter: Waiter,
    },
    /// Straight from upstream, not stored (the disk was full).
    Direct {
        digest: Digest,
        source: Source,
    },
}

impl Served {
    pub(crate) fn stored(blob: Box<dyn StoredBlob>, lookup: Lookup) -> Self {
        let info = blob.info();
        Served {
            info: ServedInfo {
                size: Some(info.size),
                media_type: info.media_type.clone(),
                lookup,
            },
            source: ServedSource::Stored(blob),
        }
    }

    /// Bytes held in memory, as stored under their digest.
    pub(crate) fn memory(bytes: Bytes, media_type: Option<String>) -> Self {
        Served {
            info: ServedInfo {
                size: Some(bytes.len() as u64),
                media_type,
                lookup: Lookup::Hit,
            },
            source: ServedSource::Memory(bytes),
        }
    }

    /// The whole content when it is held in memory (cheap: shared, not
    /// copied).
    pub fn in_memory(&self) -> Option<Bytes> {
        match &self.source {
            ServedSource::Memory(b) => Some(b.clone()),
            _ => None,
        }
    }

    pub(crate) fn growing(info: ServedInfo, reader: Arc<dyn GrowingBlob>, rx: watch::Receiver<Progress>) -> Self {
        Served {
            info,
            source: ServedSource::Growing {
                reader,
                rx,
                waiter: Waiter::new(),
            },
        }
    }

    /// Bytes streamed from upstream without being stored; verified like a
    /// download (the last byte only once the digest matched).
    pub(crate) fn direct(digest: Digest, source: Source) -> Self {
        Served {
            info: ServedInfo {
                size: source.length,
                media_type: source.media_type.clone(),
                lookup: Lookup::Miss,
            },
            source: ServedSource::Direct { digest, source },
        }
    }

    /// The bytes `[start, end)` (end `None` = to the end) as a stream.
    pub fn into_stream(self, start: u64, end: Option<u64>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let stream: ByteStream = match self.source {
            ServedSource::Stored(blob) => {
                let size = blob.info().size;
                let end = end.map_or(size, |e| e.min(size));
                blob.read(start, end)
            }
            ServedSource::Memory(b) => {
                let len = b.len() as u64;
                let (start, end) = (start.min(len), end.map_or(len, |e| e.min(len)));
                let piece = b.slice(start as usize..end.max(start) as usize);
                Box::pin(futures_util::stream::iter((!piece.is_empty()).then_some(Ok(piece))))
            }
            ServedSource::Growing { reader, rx, waiter } => Box::pin(follow(reader, rx, start, end, waiter)),
            ServedSource::Direct { digest, source } => Box::pin(direct(digest, source, start, end)),
        };
        stream
    }
}

/// Reads a growing download from `start`, never past what the leader has
/// published, holding the last byte back until the download is verified.
fn follow(
    reader: Arc<dyn GrowingBlob>,
    rx: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
    waiter: Waiter,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    struct State {
        reader: Arc<dyn GrowingBlob>,
        rx: watch::Receiver<Progress>,
        pos: u64,
        end: Option<u64>,
        failed: bool,
        _waiter: Waiter,
    }
    let state = State {
        reader,
        rx,
        pos: start,
        end,
        failed: false,
        _waiter: waiter,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.failed {
            return None;
        }
        loop {
            if st.end.is_some_and(|e| st.pos >= e) {
                return None;
            }
            let progress = st.rx.borrow_and_update().clone();
            let limit = match progress {
                Progress::Failed(e) => {
                    st.failed = true;
                    return Some((Err(io::Error::other(e.to_string())), st));
                }
                // Set only before a download has bytes, so never seen by a
                // follower already attached; a broken transfer if it were.
                Progress::Uncached => {
                    st.failed = true;
                    return Some((Err(io::Error::other("download was not stored: disk full")), st));
                }
                Progress::Opening => 0,
                Progress::Growing { written } => written.saturating_sub(1),
                Progress::Done { size } => {
                    st.end = Some(st.end.map_or(size, |e| e.min(size)));
                    size
                }
            };
            let limit = st.end.map_or(limit, |e| e.min(limit));
            if st.pos < limit {
                let want = (limit - st.pos).min(READ_CHUNK as u64) as usize;
                return match st.reader.read_at(st.pos, want).await {
                    Ok(b) if b.is_empty() => {
                        st.failed = true;
                        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "download ended early");
                        Some((Err(e), st))
                    }
                    Ok(b) => {
                        st.pos += b.len() as u64;
                        Some((Ok(b), st))
                    }
                    Err(e) => {
                        st.failed = true;
                        Some((Err(e), st))
                    }
                };
            }
            if st.end.is_some_and(|e| st.pos >= e) {
                return None;
            }
            if st.rx.changed().await.is_err() {
                st.failed = true;
                return Some((Err(io::Error::other("download ended without a result")), st));
            }
        }
    })
}

/// Streams `[start, end)` of an upstream body that is not being stored,
/// reading it whole to check its length and digest, and holding the last
/// piece sent back until both are right: a wrong body reaches the client
/// as a broken transfer, as it would through the store.
fn direct(
    digest: Digest,
    source: Source,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    struct State {
        digest: Digest,
        body: ByteStream,
        hasher: Option<crate::reference::Hasher>,
        length: Option<u64>,
        limit: Option<u64>,
        pos: u64,
        start: u64,
        end: Option<u64>,
        held: Option<Bytes>,
        done: bool,
    }
    let state = State {
        hasher: Some(digest.hasher()),
        digest,
        body: source.body,
        length: source.length,
        limit: source.length.or(source.max_len),
        pos: 0,
        start,
        end,
        held: None,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.body.next().await {
                Some(Ok(chunk)) => {
                    let at = st.pos;
                    st.pos += chunk.len() as u64;
                    if st.limit.is_some_and(|l| st.pos > l) {
                        st.done = true;
                        return Some((Err(io::Error::other("upstream sent more than announced")), st));
                    }
                    if let Some(h) = st.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    // The part of this chunk inside the requested range.
                    let from = st.start.max(at);
                    let to = st.end.map_or(st.pos, |e| e.min(st.pos));
                    if from >= to {
                        continue;
                    }
                    let piece = chunk.slice((from - at) as usize..(to - at) as usize);
                    if let Some(prev) = st.held.replace(piece) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    let got = st.hasher.take().map(|h| h.finish());
                    let short = st.length.is_some_and(|l| l != st.pos);
                    if short || got.as_ref() != Some(&st.digest) {
                        METRICS.verify_failures.inc();
                        let e = io::Error::other(format!("upstream content does not match {}", st.digest));
                        return Some((Err(e), st));
                    }
                    return st.held.take().map(|b| (Ok(b), st));
                }
            }
        }
    })
}
