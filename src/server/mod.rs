//! Listeners and connections: TLS (SNI picks the leaf certificate) and plain
//! HTTP, each speaking HTTP/1.1 and HTTP/2, with graceful shutdown.
//!
//! The accept loop never waits on a client: the TLS handshake runs in the
//! connection's own task under a deadline. Everything a client can make the
//! server hold is bounded (`[limits]`): connections in total and per client
//! address, the time a connection may take to finish its handshake, to send
//! its first request and to sit idle, and HTTP/2 streams and send buffers.
//! When a cap is reached, the connection that has been idle longest (no
//! request in flight, including one that never sent anything) is closed to
//! make room; a new connection is refused only when every connection it
//! would compete with is busy, so a crowd of silent sockets cannot lock real
//! clients out.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::Limits;
use crate::registry::body::Body;
use crate::registry::{handle, App, ConnInfo};
use crate::tls::LeafIssuer;

mod h2_streams;
mod write_batch;
use h2_streams::{poll_connection, StreamExecutor, Streams};
use write_batch::{BatchFlush, WriteBatch};

/// How long in-flight responses may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// HTTP/2 pings on an otherwise quiet connection, so a peer that vanished
/// without closing is noticed even while its streams wait for data.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Per-stream HTTP/2 send buffer: a stream asks its body for more only when
/// less than this is queued, so a slow reader holds about one chunk per
/// stream, not hyper's default 400 KiB plus a chunk.
const H2_MAX_SEND_BUF: usize = 64 * 1024;

pub struct Listeners {
    pub https: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

/// Connections the kernel completes while the accept loop catches up. A
/// burst larger than this is dropped by the kernel before regmirror sees it
/// (the client then retries its SYN or ACK), so keep it at the usual
/// `net.core.somaxconn` rather than tokio's 1,024.
const LISTEN_BACKLOG: u32 = 4096;

impl Listeners {
    pub async fn bind(https: Option<SocketAddr>, http: Option<SocketAddr>) -> std::io::Result<Self> {
        let bind = |a: SocketAddr| async move {
            let listen = || {
                let socket = match a {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.set_reuseaddr(true)?;
                socket.bind(a)?;
                socket.listen(LISTEN_BACKLOG)
            };
            listen().map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))
        };
        Ok(Listeners {
            https: match https {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
            http: match http {
                Some(a) => Some(bind(a).await?),
                None => None,
            },
        })
    }
}

/// Serves until `shutdown` resolves, then lets open connections finish for
/// up to [`SHUTDOWN_GRACE`].
pub async fn run(
    app: Arc<App>,
    issuer: Arc<LeafIssuer>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(issuer);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let limits = app.settings.limits.clone();
    crate::registry::body::set_memory_budget(limits.memory_budget);
    let (stop_tx, stop_rx) = watch::channel(false);
    let table = Arc::new(ConnTable::new(limits));
    let mut loops = Vec::new();
    if let Some(l) = listeners.https {
        tracing::info!(addr = %l.local_addr()?, "TLS listener ready");
        loops.push(tokio::spawn(accept_loop(
            l,
            Some(acceptor.clone()),
            app.clone(),
            table.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = listeners.http {
        tracing::info!(addr = %l.local_addr()?, "plain HTTP listener ready");
        loops.push(tokio::spawn(accept_loop(
            l,
            None,
            app.clone(),
            table.clone(),
            stop_rx.clone(),
        )));
    }
    shutdown.await;
    tracing::info!("shutting down: no new connections; letting open ones finish");
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    tokio::select! {
        _ = table.all_closed() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; cutting remaining connections"),
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    table: Arc<ConnTable>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // `[access] allow`: networks outside it never get a handshake.
        if !app.auth.clients.allows(peer.ip()) {
            crate::metrics::METRICS.connections_refused.inc();
            tracing::warn!(%peer, "connection refused: client address not in [access] allow");
            continue;
        }
        let conn = match table.admit(peer.ip()) {
            Ok(c) => c,
            Err(refused) => {
                tracing::warn!(%peer, "{refused}; closing new connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, peer, tls.clone(), app.clone(), conn, stop.clone()));
    }
}

/// One connection from accept to close: handshake, then HTTP until the
/// client leaves, a timeout fires, the table reclaims it, or shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    conn: Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = conn.table.limits.clone();
    let Some(acceptor) = tls else {
        let info = ConnInfo {
            sni: None,
            tls: false,
            peer: Some(peer),
        };
        return serve(TokioIo::new(stream), None, app, info, conn, stop).await;
    };
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
    let tls_stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return;
            }
        },
        _ = conn.reclaimed.notified() => {
            tracing::debug!(%peer, "closing a connection still in its TLS handshake to make room");
            return;
        }
        _ = stop.changed() => return,
    };
    let sni = tls_stream.get_ref().1.server_name().map(|s| s.to_ascii_lowercase());
    let info = ConnInfo {
        sni,
        tls: true,
        peer: Some(peer),
    };
    // The first-request deadline starts once the handshake is done.
    conn.touch();
    if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let (io, batch) = WriteBatch::new(tls_stream);
        serve(TokioIo::new(io), Some(batch), app, info, conn, stop).await
    } else {
        serve(TokioIo::new(tls_stream), None, app, info, conn, stop).await
    }
}

/// `batch`: for HTTP/2 over TLS, sends what the connection's streams wrote
/// each time they have run (see `write_batch`).
async fn serve<I>(
    io: I,
    batch: Option<Arc<dyn BatchFlush>>,
    app: Arc<App>,
    info: ConnInfo,
    conn: Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.peer;
    let limits = conn.table.limits.clone();
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let app = app.clone();
            let info = info.clone();
            let request = Request::begin(&conn);
            async move {
                let resp = handle(app, info, req).await;
                Ok::<_, std::convert::Infallible>(resp.map(|body| TrackedBody { body, request }))
            }
        })
    };
    let executor = StreamExecutor::default();
    let mut streams = Streams::new(executor.clone());
    let mut builder = auto::Builder::new(executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        // Generous transport limits; the handler enforces the real one
        // (`MAX_HEADER_BYTES`) so that clients get an OCI error body.
        .max_buf_size(256 * 1024)
        .max_headers(200)
        // hyper starts this clock whenever it waits for a head, idle
        // keep-alive included, so it doubles as the HTTP/1 idle timeout;
        // the first request's tighter deadline is the connection loop's.
        .header_read_timeout(limits.idle_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .max_header_list_size(256 * 1024);
    let http = builder.serve_connection(io, service);
    tokio::pin!(http);
    let mut draining = false;
    loop {
        let wake_at = conn.deadline().unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        conn.arm(wake_at);
        tokio::select! {
            result = std::future::poll_fn(|cx| poll_connection(http.as_mut(), &mut streams, batch.as_deref(), cx)) => {
                if let Err(e) = result {
                    tracing::debug!(peer = ?peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = conn.reclaimed.notified() => {
                tracing::debug!(peer = ?peer, "closing an idle connection to make room");
                return;
            }
            _ = conn.changed.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {
                if let Some(why) = conn.expired() {
                    tracing::info!(peer = ?peer, "closing connection: {why}");
                    return;
                }
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("connection limit reached and every connection is busy")]
    Total,
    #[error("per-client connection limit reached and every connection of this client is busy")]
    PerClient,
}

/// Every open connection, in both listeners, with what the caps and the
/// "longest idle goes first" rule need to know.
struct ConnTable {
    limits: Limits,
    inner: Mutex<TableInner>,
    /// Woken whenever the table becomes empty (for shutdown).
    emptied: Notify,
}

#[derive(Default)]
struct TableInner {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    per_client: HashMap<IpAddr, usize>,
}

/// A connection as the table sees it. Whether it is idle is read from the
/// connection itself, and only when a cap is reached: requests do not take
/// the table's lock.
struct Entry {
    ip: IpAddr,
    /// Not an `Arc`: the `Conn`'s drop is what removes the entry.
    conn: Weak<Conn>,
    /// The connection's [`Conn::reclaimed`].
    reclaimed: Arc<Notify>,
}

impl ConnTable {
    fn new(limits: Limits) -> Self {
        ConnTable {
            limits,
            inner: Mutex::new(TableInner::default()),
            emptied: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection from `ip`, closing the longest-idle
    /// connection (that client's own, when it is the per-client cap that is
    /// reached) if a cap is reached, or refuses it when none is idle.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<Conn>, Refused> {
        let ip = ip.to_canonical();
        let mut t = self.lock();
        let from_client = t.per_client.get(&ip).copied().unwrap_or(0);
        if from_client >= self.limits.max_connections_per_client {
            let victim = t.longest_idle(Some(ip)).ok_or(Refused::PerClient)?;
            t.reclaim(victim);
        } else if t.conns.len() >= self.limits.max_connections {
            let victim = t.longest_idle(None).ok_or(Refused::Total)?;
            t.reclaim(victim);
        }
        let id = t.next_id;
        t.next_id += 1;
        let now = Instant::now();
        let conn = Arc::new(Conn {
            id,
            table: self.clone(),
            started: now,
            in_flight: AtomicUsize::new(0),
            with_client: AtomicUsize::new(0),
            served_any: AtomicBool::new(false),
            last_progress_ms: AtomicU64::new(0),
            armed_ms: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
            reclaimed: Arc::new(Notify::new()),
        });
        t.conns.insert(
            id,
            Entry {
                ip,
                conn: Arc::downgrade(&conn),
                reclaimed: conn.reclaimed.clone(),
            },
        );
        *t.per_client.entry(ip).or_insert(0) += 1;
        Ok(conn)
    }

    fn remove(&self, id: u64) {
        let mut t = self.lock();
        t.forget(id);
        if t.conns.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    async fn all_closed(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.lock().conns.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

impl TableInner {
    /// The connection (of `ip`, when given) with no request in flight for
    /// the longest time, a connection still in its handshake included.
    fn longest_idle(&self, ip: Option<IpAddr>) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, e)| ip.is_none_or(|ip| e.ip == ip))
            .filter_map(|(id, e)| Some((e.conn.upgrade()?.idle_since()?, *id)))
            .min()
            .map(|(_, id)| id)
    }

    /// Takes `id` out of the table at once (its slot is free for the
    /// connection being admitted) and tells its task to close.
    fn reclaim(&mut self, id: u64) {
        if let Some(e) = self.forget(id) {
            e.reclaimed.notify_one();
        }
    }

    fn forget(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&e.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&e.ip);
            }
        }
        Some(e)
    }
}

/// One connection's state, shared by its task, its requests and their
/// response bodies. Dropped (and so removed from the table) when the last
/// of them goes.
struct Conn {
    id: u64,
    table: Arc<ConnTable>,
    started: Instant,
    /// Requests whose response hyper has not finished with.
    in_flight: AtomicUsize,
    /// In-flight responses whose last chunk hyper holds and has not sent on:
    /// the client is not reading (or its flow-control window is shut).
    with_client: AtomicUsize,
    served_any: AtomicBool,
    /// Milliseconds after `started` of the last sign of life: handshake
    /// done, a request begun or ended, a chunk handed to hyper or taken off.
    last_progress_ms: AtomicU64,
    /// When the connection task's timer fires (milliseconds after
    /// `started`; `u64::MAX` before it is first set).
    armed_ms: AtomicU64,
    /// Wakes the connection task when its deadline moved before its timer.
    changed: Notify,
    /// Tells the connection task the table closed it to make room.
    reclaimed: Arc<Notify>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.remove(self.id);
    }
}

impl Conn {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    fn last_progress(&self) -> Instant {
        self.started + Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed))
    }

    /// Since when no request has been in flight (since the connection was
    /// accepted, when none came yet); `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| self.last_progress())
    }

    /// The connection task's timer is set for `at`.
    fn arm(&self, at: Instant) {
        let ms = u64::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        self.armed_ms.store(ms, Ordering::Release);
    }

    /// Wakes the connection task when the deadline is now earlier than its
    /// timer. A later deadline needs no wake-up: the timer fires, finds the
    /// connection not yet expired, and is set again. (Waking the task at the
    /// end of every request was a few percent of a warm manifest's CPU.)
    fn deadline_moved(&self) {
        let Some(deadline) = self.deadline() else { return };
        let armed = self.armed_ms.load(Ordering::Acquire);
        let due = u64::try_from(deadline.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        if due < armed {
            self.changed.notify_one();
        }
    }

    /// When this connection is to be closed unless something happens first;
    /// `None` while all it waits for is regmirror (a handler at work, a
    /// download, the memory budget). The connection loop re-checks at least
    /// every `idle_timeout`, so a stall is noticed within twice that.
    fn deadline(&self) -> Option<Instant> {
        let limits = &self.table.limits;
        if !self.served_any.load(Ordering::Acquire) {
            Some(self.last_progress() + limits.first_request_timeout)
        } else if self.in_flight.load(Ordering::Acquire) == 0 || self.with_client.load(Ordering::Acquire) > 0 {
            Some(self.last_progress() + limits.idle_timeout)
        } else {
            None
        }
    }

    /// Why the connection is to be closed now, if it is.
    fn expired(&self) -> Option<&'static str> {
        let deadline = self.deadline()?;
        if Instant::now() < deadline {
            return None;
        }
        Some(if !self.served_any.load(Ordering::Acquire) {
            "no request within limits.first_request_timeout"
        } else if self.in_flight.load(Ordering::Acquire) == 0 {
            "idle for limits.idle_timeout"
        } else {
            "client read nothing for limits.idle_timeout"
        })
    }
}

/// A request in flight on a connection, from the moment hyper hands it to
/// the service until its response body is finished or dropped.
struct Request {
    conn: Arc<Conn>,
    /// hyper holds this response's last chunk and has not asked for another.
    with_client: bool,
}

impl Request {
    fn begin(conn: &Arc<Conn>) -> Request {
        conn.served_any.store(true, Ordering::Release);
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.touch();
        Request {
            conn: conn.clone(),
            with_client: false,
        }
    }

    /// hyper asks for the next chunk, so the previous one is on its way.
    fn polled(&mut self) {
        if self.with_client {
            self.with_client = false;
            self.conn.with_client.fetch_sub(1, Ordering::AcqRel);
            self.conn.touch();
        }
    }

    /// A chunk went to hyper; until it asks again, the client holds things up.
    fn handed_over(&mut self) {
        if !self.with_client {
            self.with_client = true;
            self.conn.with_client.fetch_add(1, Ordering::AcqRel);
            self.conn.touch();
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.with_client {
            self.conn.with_client.fetch_sub(1, Ordering::AcqRel);
        }
        self.conn.touch();
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.deadline_moved();
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper
/// is done with it, and records whether the client or regmirror holds up
/// the next chunk.
struct TrackedBody {
    body: Body,
    request: Request,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        this.request.polled();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.request.handed_over();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
