//! HTTP/1.1 connections that hold no HTTP buffers while they are idle.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB header buffer for as long
//! as a connection lives, kept-alive and idle included, and has no option
//! to release them: with the connection task around them an idle
//! kept-alive TLS connection cost 37 KiB, where nginx holds about 15. A fleet
//! keeps thousands of those open between pulls.
//!
//! So a connection alternates between two states. While requests come,
//! hyper serves them on the socket wrapped in a [`Handback`]. Once the last
//! response is written and flushed and nothing new has arrived for
//! [`HANDBACK_AFTER`], the `Handback` tells hyper the client has finished
//! (end of stream); hyper ends cleanly without shutting the socket down,
//! and hands it back (`into_parts`). The connection then waits for the
//! next bytes with a small buffer of its own, under the same deadlines,
//! and when they come starts a new hyper connection with those bytes
//! replayed first.
//!
//! What the client sees is one kept-alive connection: nothing is written
//! on the hand-back, and no byte it sent is lost, because hand-back only
//! happens when every byte received was part of a finished request
//! ([`Signals::activity`]). The one exception is a pipelining client whose
//! next request head arrived, incomplete, in the same read as the previous
//! request and then stalls: its half a head is dropped with the connection,
//! as admission would drop it to make room.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::admission::Activity;
use super::{drive, h1_options, service, Conn, Ended, Signals};
use crate::registry::{App, ConnInfo};

/// What the idle wait reads the next request's first bytes into; hyper
/// reads the rest. Part of every idle connection's task, so small.
const FIRST_READ: usize = 64;
/// How long a connection is idle before hyper hands it back. Requests of
/// one pull follow each other closely; rebuilding hyper's connection for
/// each cost a tenth of a warm manifest GET's rate.
const HANDBACK_AFTER: Duration = Duration::from_secs(1);
/// How long saying goodbye (TLS close_notify) to an idle client may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves HTTP/1.1 on `io` until the client leaves, a deadline passes, the
/// table reclaims the connection or regmirror shuts down.
pub(super) async fn serve<S>(mut io: S, app: Arc<App>, info: ConnInfo, conn: Arc<Conn>, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut replay = Bytes::new();
    loop {
        // Boxed: hyper's connection and its buffers exist only while it
        // serves, not in the idle connection's task. (In a `let` of its
        // own: a temporary of the statement that awaits would keep its
        // room in this future's state, boxed or not.)
        let requests = Box::pin(requests(io, replay, &app, &info, &conn, &mut stop));
        let served = requests.await;
        let Some((back, unread)) = served else { return };
        io = back;
        replay = unread;
        if replay.is_empty() {
            match next_bytes(&mut io, &info, &conn, &mut stop).await {
                Next::Request(first) => replay = first,
                Next::Close => {
                    // What hyper would have sent: TLS close_notify, then FIN.
                    let _ = tokio::time::timeout(CLOSE_GRACE, io.shutdown()).await;
                    return;
                }
                Next::Gone => return,
            }
        }
    }
}

/// What the idle wait ends with.
enum Next {
    /// The first bytes of the client's next request.
    Request(Bytes),
    /// regmirror closes the connection (a deadline, the table, shutdown).
    Close,
    /// The client closed it, or the socket failed.
    Gone,
}

/// One hyper connection over `io`, `replay` read first. Returns the socket
/// (and anything hyper read past the last request) when the connection
/// went idle; `None` when it is over.
async fn requests<S>(
    io: S,
    replay: Bytes,
    app: &Arc<App>,
    info: &ConnInfo,
    conn: &Arc<Conn>,
    stop: &mut watch::Receiver<bool>,
) -> Option<(S, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &conn.table.limits;
    let io = TokioIo::new(Handback {
        inner: io,
        replay,
        signals: conn.signals.clone(),
        writes: 0,
        flushed: true,
        spell: None,
        timer: None,
        handed_back: false,
    });
    let mut builder = http1::Builder::new();
    h1_options!(&mut builder, limits);
    let mut http = builder.serve_connection(io, service(app.clone(), info.clone(), conn.clone()));
    let ended = drive(
        Pin::new(&mut http),
        |c| c.graceful_shutdown(),
        None,
        None,
        conn,
        stop,
        info.peer,
    )
    .await;
    if ended != Ended::Finished {
        return None;
    }
    let parts = http.into_parts();
    let handback = parts.io.into_inner();
    handback.handed_back.then_some((handback.inner, parts.read_buf))
}

/// Waits, holding only the socket, for the first bytes of the next request.
async fn next_bytes<S>(io: &mut S, info: &ConnInfo, conn: &Conn, stop: &mut watch::Receiver<bool>) -> Next
where
    S: AsyncRead + Unpin,
{
    let peer = info.peer;
    let limits = &conn.table.limits;
    let mut buf = [0u8; FIRST_READ];
    loop {
        let wake_at = conn.deadline().unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        conn.arm(wake_at);
        tokio::select! {
            read = io.read(&mut buf) => return match read {
                Ok(0) => Next::Gone,
                Ok(n) => Next::Request(Bytes::copy_from_slice(&buf[..n])),
                Err(e) => {
                    tracing::debug!(peer = ?peer, error = %e, "idle connection ended with an error");
                    Next::Gone
                }
            },
            _ = conn.signals.reclaimed.notified() => {
                tracing::debug!(peer = ?peer, "closing an idle connection to make room");
                return Next::Close;
            }
            _ = conn.changed.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {
                if let Some(why) = conn.expired() {
                    // Routine for a kept-alive connection: not worth a line
                    // per client at info.
                    tracing::debug!(peer = ?peer, "closing connection: {why}");
                    return Next::Close;
                }
            }
            _ = stop.changed() => return Next::Close,
        }
    }
}

/// The socket as hyper sees it: bytes to replay first, and an end of
/// stream once the connection has been idle for [`HANDBACK_AFTER`], so
/// that hyper hands the socket back.
///
/// Idle is [`Signals::activity`]'s (a request served, none in flight, no
/// byte since) with everything hyper wrote flushed, and it must hold with
/// no write and no byte received for the whole spell: hyper can read right
/// after it buffered a response's end, before flushing it, and its flush,
/// which follows in the same poll, is a write. The spell keeps a client
/// that sends its next request at once (a pull's requests follow each
/// other within milliseconds) on the same hyper connection.
struct Handback<S> {
    inner: S,
    replay: Bytes,
    signals: Arc<Signals>,
    /// Writes hyper has made (or tried to make) so far.
    writes: u64,
    /// Whether hyper's last write was followed by a flush that finished.
    flushed: bool,
    /// `(bytes received, writes)` when this idle spell began, and when.
    spell: Option<((u64, u64), Instant)>,
    /// Wakes hyper when the spell may be over; set once, moved on as needed.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// End of stream was reported: hyper must not shut the socket down.
    handed_back: bool,
}

impl<S> Handback<S> {
    fn idle(&self) -> bool {
        self.flushed && matches!(self.signals.activity(), Activity::Idle { .. })
    }

    /// Whether the idle spell that includes now is over; if not, hyper is
    /// woken when it may be.
    fn spell_over(&mut self, cx: &mut Context<'_>) -> bool {
        let seen = (self.signals.bytes_in.load(Ordering::Acquire), self.writes);
        let now = Instant::now();
        let began = match self.spell {
            Some((was, began)) if was == seen => began,
            _ => {
                self.spell = Some((seen, now));
                now
            }
        };
        let due = began + HANDBACK_AFTER;
        if now >= due {
            return true;
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        // A timer set for an earlier spell fires early; it is moved on
        // then, not at every request.
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= due {
                return true;
            }
            timer.as_mut().reset(due);
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Handback<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.handed_back {
            return Poll::Ready(Ok(()));
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if polled.is_ready() || !this.idle() {
            this.spell = None;
            return polled;
        }
        if this.spell_over(cx) {
            this.handed_back = true;
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Handback<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.writes += 1;
        this.flushed = false;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.writes += 1;
        this.flushed = false;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.flushed = true;
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.handed_back {
            // hyper is done with the socket; the connection is not.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
