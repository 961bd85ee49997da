//! One socket write per wake-up of an HTTP/2 connection, however many
//! responses it produced.
//!
//! The h2 crate flushes its output before it queues each DATA frame larger
//! than 256 bytes, so every manifest response cost a TLS record and a
//! `writev` of its own (issue 16's profile: one `writev` per request, 18% of
//! regmirror's CPU under h2load). Between h2 and TLS, [`WriteBatch`] takes
//! what h2 writes into one buffer and treats h2's flushes as "ready when you
//! are"; the connection's task, when it has run every stream it could,
//! sends the buffer with [`BatchFlush::flush`]: one record run through TLS
//! and one system call for everything that stream round produced.
//!
//! The buffer is bounded ([`BATCH_LIMIT`]): past it, a write waits for the
//! socket exactly as it would without the batch, so a client that stops
//! reading holds no more than before. A blob's DATA frames (16 KiB and a
//! 9-byte header each, at the usual frame size) are batched too: four
//! frames are one `writev` of full TLS records, where one write per frame
//! made a full record and a 9-byte one each, for the client to decrypt one
//! by one. Only a write larger than the whole buffer goes through as it is.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes held back for one flush. Larger writes go to the socket as
/// they come, after what was held.
pub const BATCH_LIMIT: usize = 64 * 1024;

/// The I/O a connection's HTTP code reads and writes.
pub struct WriteBatch<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

/// The connection task's side: sends what was held back.
pub trait BatchFlush: Send + Sync {
    /// Writes and flushes everything held back. Pending while the socket is
    /// full; the task is then woken when it can take more. `quiet`: no
    /// response is under way, so the buffer's memory goes back once it is
    /// drained (a blob's batches may have grown it to [`BATCH_LIMIT`], and
    /// an idle connection should not keep that).
    fn flush(&self, cx: &mut Context<'_>, quiet: bool) -> Poll<()>;
}

struct Shared<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written.
    sent: usize,
    /// Whether `io` has unflushed bytes (it may buffer too, as TLS does).
    dirty: bool,
    /// A write failure seen by the connection task's flush, returned to the
    /// HTTP code on its next write so that it ends the connection.
    failed: Option<io::ErrorKind>,
}

impl<T> WriteBatch<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub fn new(io: T) -> (Self, Arc<dyn BatchFlush>) {
        let shared = Arc::new(Mutex::new(Shared {
            io,
            buf: Vec::new(),
            sent: 0,
            dirty: false,
            failed: None,
        }));
        (WriteBatch { shared: shared.clone() }, Arc::new(Flusher { shared }))
    }
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: AsyncWrite + Unpin> Shared<T> {
    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(kind) => Err(io::Error::new(kind, "an earlier write to this connection failed")),
            None => Ok(()),
        }
    }

    /// Writes out what is held back, without flushing `io`.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.dirty = true;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn drain_and_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        if self.dirty {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes. `Ready(false)`: too large to hold,
    /// write them through (what was held has been written first).
    fn make_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        self.check()?;
        if self.buf.len() + len > BATCH_LIMIT {
            ready!(self.drain(cx))?;
        }
        Poll::Ready(Ok(len <= BATCH_LIMIT))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteBatch<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.shared).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteBatch<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.shared);
        if !ready!(s.make_room(cx, data.len()))? {
            s.dirty = true;
            return Pin::new(&mut s.io).poll_write(cx, data);
        }
        s.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.shared);
        let len = bufs.iter().map(|b| b.len()).sum();
        if !ready!(s.make_room(cx, len))? {
            s.dirty = true;
            return Pin::new(&mut s.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            s.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Held back for the connection task's [`BatchFlush::flush`].
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(lock(&self.shared).check())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.shared);
        s.check()?;
        ready!(s.drain_and_flush(cx))?;
        Pin::new(&mut s.io).poll_shutdown(cx)
    }
}

struct Flusher<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

impl<T: AsyncWrite + Unpin + Send> BatchFlush for Flusher<T> {
    fn flush(&self, cx: &mut Context<'_>, quiet: bool) -> Poll<()> {
        let mut s = lock(&self.shared);
        if s.failed.is_some() {
            return Poll::Ready(());
        }
        match ready!(s.drain_and_flush(cx)) {
            Ok(()) if quiet => s.buf = Vec::new(),
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(error = %e, "writing to the client failed");
                s.failed = Some(e.kind());
            }
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_and_flushes_leave_only_with_the_tasks_flush() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let (mut batch, flusher) = WriteBatch::new(near);
        batch.write_all(b"one ").await.unwrap();
        batch.flush().await.unwrap();
        batch.write_all(b"two").await.unwrap();
        batch.flush().await.unwrap();
        let mut got = [0u8; 7];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut got)).await;
        assert!(early.is_err(), "nothing reaches the peer before the task's flush");
        std::future::poll_fn(|cx| flusher.flush(cx, false)).await;
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
    }

    #[tokio::test]
    async fn a_full_batch_waits_for_the_peer_and_loses_nothing() {
        // The peer's pipe holds less than one batch: writes past the limit
        // must wait for it to read, and every byte arrives in order.
        let (near, mut far) = tokio::io::duplex(4096);
        let (mut batch, flusher) = WriteBatch::new(near);
        let data: Vec<u8> = (0..(3 * BATCH_LIMIT + 123)).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.unwrap();
            got
        });
        for piece in data.chunks(1000) {
            batch.write_all(piece).await.unwrap();
        }
        std::future::poll_fn(|cx| flusher.flush(cx, false)).await;
        batch.shutdown().await.unwrap();
        drop(batch);
        drop(flusher);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_large_write_goes_out_after_what_was_held() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let (mut batch, flusher) = WriteBatch::new(near);
        const LARGE: usize = BATCH_LIMIT + 1;
        let large = vec![7u8; LARGE];
        batch.write_all(b"head").await.unwrap();
        batch.write_all(&large).await.unwrap();
        batch.write_all(b"tail").await.unwrap();
        std::future::poll_fn(|cx| flusher.flush(cx, false)).await;
        let mut got = vec![0u8; 8 + LARGE];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..4 + LARGE].iter().all(|&b| b == 7));
        assert_eq!(&got[4 + LARGE..], b"tail");
    }

    #[tokio::test]
    async fn a_quiet_flush_gives_the_buffer_back_and_a_busy_one_keeps_it() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let (mut batch, flusher) = WriteBatch::new(near);
        let held = |batch: &WriteBatch<tokio::io::DuplexStream>| lock(&batch.shared).buf.capacity();
        batch.write_all(&[1u8; 20_000]).await.unwrap();
        std::future::poll_fn(|cx| flusher.flush(cx, false)).await;
        assert!(held(&batch) >= 20_000, "a response under way keeps its buffer");
        batch.write_all(&[2u8; 100]).await.unwrap();
        std::future::poll_fn(|cx| flusher.flush(cx, true)).await;
        assert_eq!(held(&batch), 0, "an idle connection holds no batch buffer");
        let mut got = vec![0u8; 20_100];
        far.read_exact(&mut got).await.unwrap();
        assert!(got[..20_000].iter().all(|&b| b == 1) && got[20_000..].iter().all(|&b| b == 2));
    }

    #[tokio::test]
    async fn a_failed_flush_fails_the_next_write() {
        let (near, far) = tokio::io::duplex(1024);
        let (mut batch, flusher) = WriteBatch::new(near);
        drop(far);
        batch.write_all(b"lost").await.unwrap();
        std::future::poll_fn(|cx| flusher.flush(cx, false)).await;
        assert!(batch.write_all(b"more").await.is_err());
    }
}
