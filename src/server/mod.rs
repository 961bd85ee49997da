//! Listeners and connections: TLS (SNI picks the leaf certificate) and plain
//! HTTP, each speaking HTTP/1.1 and HTTP/2, with graceful shutdown.
//!
//! The accept loop never waits on a client: the TLS handshake runs in the
//! connection's own task under a deadline. Everything a client can make the
//! server hold is bounded (`[limits]`): connections in total (with a
//! per-address share near the cap, see `admission`), the time a connection
//! may take to finish its handshake, to send its first request and to sit
//! idle, and HTTP/2 streams and send buffers. When the table is full an idle
//! connection of the heaviest client makes room, so a crowd of silent
//! sockets cannot lock real clients out; a connection that cannot be
//! admitted is answered with a 503 where there is room to answer it.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::Limits;
use crate::registry::body::Body;
use crate::registry::{handle, App, ConnInfo, Listener};
use crate::tls::LeafIssuer;

mod admission;
mod connect;
mod fd_limit;
mod h2_abuse;
mod h2_streams;
mod http1;
mod write_batch;
pub use admission::Refused;
use admission::{Activity, Candidate, Decision, Policy, Pressure};
use h2_abuse::{Abuse, AbuseMark, FrameWatch};
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
/// Streams a client may open and reset before regmirror has taken them
/// up; beyond this the connection gets GOAWAY(ENHANCE_YOUR_CALM). Opening
/// and cancelling streams at once ("rapid reset") costs the client nothing
/// and the server a stream each; h2's own default, stated so that it stays.
const H2_MAX_PENDING_RESETS: usize = 20;
/// How long a connection closed to make room may take to finish: an HTTP/2
/// one gets a GOAWAY and answers the streams its client had already sent;
/// an idle HTTP/1 one closes at once.
const RECLAIM_GRACE: Duration = Duration::from_secs(5);
/// Refused connections being answered (a TLS handshake and a 503) at once;
/// beyond this a refused connection is closed unanswered, so refusing
/// cannot cost more than a bounded amount of work.
const REFUSAL_SLOTS: usize = 64;
/// What a refused client is told to wait before it tries again, in seconds.
const RETRY_AFTER_SECS: &str = "1";

pub struct Listeners {
    pub https: Option<TcpListener>,
    pub http: Option<TcpListener>,
    /// The CONNECT proxy listener (`server.connect`, see `connect`).
    pub connect: Option<TcpListener>,
}

/// Connections the kernel completes while the accept loop catches up. A
/// burst larger than this is dropped by the kernel before regmirror sees it
/// (the client then retries its SYN or ACK), so keep it at the usual
/// `net.core.somaxconn` rather than tokio's 1,024.
const LISTEN_BACKLOG: u32 = 4096;

impl Listeners {
    pub async fn bind(
        https: Option<SocketAddr>,
        http: Option<SocketAddr>,
        connect: Option<SocketAddr>,
    ) -> std::io::Result<Self> {
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
            connect: match connect {
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
        .with_cert_resolver(issuer.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = Arc::new(tls);
    let acceptor = TlsAcceptor::from(tls.clone());

    let limits = app.settings.limits.clone();
    fd_limit::ensure(limits.max_connections);
    crate::registry::body::set_memory_budget(limits.memory_budget);
    let (stop_tx, stop_rx) = watch::channel(false);
    let table = Arc::new(ConnTable::new(limits));
    let mut loops = Vec::new();
    if let Some(l) = listeners.https {
        tracing::info!(addr = %l.local_addr()?, "TLS listener ready");
        loops.push(tokio::spawn(accept_loop(
            l,
            Mode::Tls(acceptor.clone()),
            app.clone(),
            table.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = listeners.http {
        tracing::info!(addr = %l.local_addr()?, "plain HTTP listener ready");
        loops.push(tokio::spawn(accept_loop(
            l,
            Mode::Plain,
            app.clone(),
            table.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = listeners.connect {
        tracing::info!(addr = %l.local_addr()?, "CONNECT proxy listener ready");
        let proxy = Arc::new(connect::Proxy::new(&app.settings, issuer.clone(), tls.clone()));
        loops.push(tokio::spawn(accept_loop(
            l,
            Mode::Connect(proxy),
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

/// What a listener speaks on the connections it accepts.
#[derive(Clone)]
enum Mode {
    Plain,
    Tls(TlsAcceptor),
    /// HTTP CONNECT first, then a tunnel (see `connect`).
    Connect(Arc<connect::Proxy>),
}

async fn accept_loop(
    listener: TcpListener,
    mode: Mode,
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
        let _ = stream.set_nodelay(true);
        let conn = match table.admit(peer.ip()) {
            Ok(c) => c,
            Err(refused) => {
                match table.refusal_slot() {
                    Some(slot) => {
                        tracing::info!(%peer, "{refused}; answering 503");
                        let limits = table.limits.clone();
                        // A CONNECT client reads the 503 as the answer to its CONNECT.
                        let tls = match &mode {
                            Mode::Tls(a) => Some(a.clone()),
                            Mode::Plain | Mode::Connect(_) => None,
                        };
                        tokio::spawn(refuse(stream, tls, limits, refused, slot));
                    }
                    None => tracing::warn!(%peer, "{refused}, and too many refusals are being answered; closing"),
                }
                continue;
            }
        };
        let stream = Counted {
            inner: stream,
            signals: conn.signals.clone(),
        };
        match &mode {
            Mode::Plain => tokio::spawn(connection(stream, peer, None, app.clone(), conn, stop.clone())),
            Mode::Tls(a) => tokio::spawn(connection(
                stream,
                peer,
                Some(a.clone()),
                app.clone(),
                conn,
                stop.clone(),
            )),
            Mode::Connect(p) => tokio::spawn(connect::connection(
                stream,
                peer,
                p.clone(),
                app.clone(),
                conn,
                stop.clone(),
            )),
        };
    }
}

/// One connection from accept to close: handshake, then HTTP until the
/// client leaves, a timeout fires, the table reclaims it, or shutdown.
async fn connection(
    stream: Counted,
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
            listener: Listener::Plain,
        };
        // h2c is told apart from HTTP/1.1 by its preface, as hyper does.
        let io = FrameWatch::new(stream, conn.signals.clone());
        let serving = Box::pin(serve(TokioIo::new(io), app, info, conn, stop));
        return serving.await;
    };
    let handshake = handshake(&acceptor, stream, limits.handshake_timeout);
    let tls_stream = tokio::select! {
        done = handshake => match done {
            // Boxed at once: a local the stream was moved out of keeps its
            // room in this future, and an idle connection is mostly that.
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out");
                return;
            }
        },
        _ = conn.signals.reclaimed.notified() => {
            tracing::debug!(%peer, "closing a silent connection to make room");
            return;
        }
        _ = stop.changed() => return,
    };
    let sni = tls_stream.get_ref().1.server_name().map(|s| s.to_ascii_lowercase());
    let info = ConnInfo {
        sni,
        tls: true,
        peer: Some(peer),
        listener: Listener::Tls,
    };
    serve_tls(tls_stream, app, info, conn, stop).await
}

/// The TLS handshake, boxed and built outside the connection's future, so
/// that an idle connection's task keeps no room for one.
#[allow(clippy::type_complexity)]
fn handshake(
    acceptor: &TlsAcceptor,
    stream: Counted,
    deadline: Duration,
) -> Pin<Box<tokio::time::Timeout<tokio_rustls::Accept<Counted>>>> {
    Box::pin(tokio::time::timeout(deadline, acceptor.accept(stream)))
}

/// Serves HTTP (h2 when ALPN chose it) on a finished TLS handshake: the TLS
/// listener's and a CONNECT tunnel's connections alike. The stream comes
/// boxed: an async fn keeps room for what it takes by value for as long as
/// it runs, and an idle connection's task is mostly those futures.
async fn serve_tls<S>(
    tls_stream: Box<tokio_rustls::server::TlsStream<S>>,
    app: Arc<App>,
    info: ConnInfo,
    conn: Arc<Conn>,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The first-request deadline starts once the handshake is done.
    conn.touch();
    if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        conn.signals.h2.store(true, Ordering::Release);
        let (io, batch) = WriteBatch::new(FrameWatch::new(tls_stream, conn.signals.clone()));
        // Boxed, so that the task of an idle HTTP/1 connection is small
        // (see `http1`).
        let serving = Box::pin(serve_h2(TokioIo::new(io), batch, app, info, conn, stop));
        serving.await
    } else {
        http1::serve(tls_stream, app, info, conn, stop).await
    }
}

/// The request handler as hyper calls it: every request counted on `conn`
/// from the moment hyper hands it over until its response body is done.
fn service(
    app: Arc<App>,
    info: ConnInfo,
    conn: Arc<Conn>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = hyper::Response<TrackedBody>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Send
       + 'static {
    service_fn(move |req| {
        let app = app.clone();
        let info = info.clone();
        let request = Request::begin(&conn);
        async move {
            let client = info.peer.map(|p| p.ip());
            let resp = crate::events::with_client(client, handle(app, info, req)).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| TrackedBody { body, request }))
        }
    })
}

/// hyper's HTTP/1 settings, for the `http1` builder and the plain
/// listener's `auto` one alike (the two types share the method names).
macro_rules! h1_options {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            // Generous transport limits; the handler enforces the real one
            // (`MAX_HEADER_BYTES`) so that clients get an OCI error body.
            .max_buf_size(256 * 1024)
            .max_headers(200)
            // hyper starts this clock whenever it waits for a head, idle
            // keep-alive included, so it doubles as the HTTP/1 idle timeout
            // (and, after `http1`'s idle wait, as the deadline for the rest
            // of a head); the first request's tighter deadline is the
            // connection loop's.
            .header_read_timeout($limits.idle_timeout)
    };
}
pub(crate) use h1_options;

/// hyper's HTTP/2 settings, for the `http2` builder (TLS) and the plain
/// listener's `auto` one (h2c) alike.
macro_rules! h2_options {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams($limits.h2_max_streams)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .max_header_list_size(256 * 1024)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
    };
}

/// Plain HTTP: HTTP/1.1, or h2c told apart by its preface, as hyper does.
async fn serve<I>(io: I, app: Arc<App>, info: ConnInfo, conn: Arc<Conn>, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.peer;
    let limits = conn.table.limits.clone();
    let service = service(app, info, conn.clone());
    let executor = StreamExecutor::default();
    let mut streams = Streams::new(executor.clone());
    let mut builder = auto::Builder::new(executor);
    h1_options!(builder.http1(), limits);
    h2_options!(builder.http2(), limits);
    let http = builder.serve_connection(io, service);
    tokio::pin!(http);
    drive(
        http.as_mut(),
        |c| c.graceful_shutdown(),
        Some(&mut streams),
        None,
        &conn,
        &mut stop,
        peer,
    )
    .await;
}

/// HTTP/2 over TLS (ALPN chose it), on hyper's HTTP/2 connection itself:
/// `auto`'s wrapper costs every request a little and every connection its
/// room. `batch` sends what the connection's streams wrote each time they
/// have run (see `write_batch`).
async fn serve_h2<I>(
    io: I,
    batch: Arc<dyn BatchFlush>,
    app: Arc<App>,
    info: ConnInfo,
    conn: Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = info.peer;
    let limits = conn.table.limits.clone();
    let service = service(app, info, conn.clone());
    let executor = StreamExecutor::default();
    let mut streams = Streams::new(executor.clone());
    let mut builder = hyper::server::conn::http2::Builder::new(executor);
    h2_options!(&mut builder, limits);
    let http = builder.serve_connection(io, service);
    tokio::pin!(http);
    drive(
        http.as_mut(),
        |c| c.graceful_shutdown(),
        Some(&mut streams),
        Some(&*batch),
        &conn,
        &mut stop,
        peer,
    )
    .await;
}

/// How [`drive`] left a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The protocol ended it cleanly, unasked.
    Finished,
    /// An error, a deadline, the table or shutdown ended it.
    Cut,
}

/// Runs hyper's connection `http` under the connection's deadlines, the
/// table's reclaim and shutdown (`shutdown` asks it to finish gracefully).
async fn drive<C, E>(
    mut http: Pin<&mut C>,
    shutdown: fn(Pin<&mut C>),
    mut streams: Option<&mut Streams>,
    batch: Option<&dyn BatchFlush>,
    conn: &Conn,
    stop: &mut watch::Receiver<bool>,
    peer: Option<SocketAddr>,
) -> Ended
where
    C: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = &conn.table.limits;
    let mut draining = false;
    // Set once the table closed this connection to make room.
    let mut cut_at: Option<Instant> = None;
    let quiet = || conn.signals.in_flight.load(Ordering::Acquire) == 0;
    loop {
        let mut wake_at = conn.deadline().unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        if let Some(cut) = cut_at {
            wake_at = wake_at.min(cut);
        }
        conn.arm(wake_at);
        tokio::select! {
            result = std::future::poll_fn(|cx| poll_connection(http.as_mut(), streams.as_deref_mut(), batch, quiet, cx)) => {
                return match result {
                    Ok(()) if !draining => Ended::Finished,
                    Ok(()) => Ended::Cut,
                    Err(e) => {
                        let e = e.into();
                        match conn.signals.abuse.classify(&*e) {
                            Some(abuse) => h2_abuse::report(peer, abuse),
                            None => tracing::debug!(peer = ?peer, error = %e, "connection ended with an error"),
                        }
                        Ended::Cut
                    }
                };
            }
            _ = conn.signals.reclaimed.notified(), if cut_at.is_none() => {
                // Gracefully: a request the client sent just now is still
                // answered (HTTP/2: GOAWAY; HTTP/1: closed once idle).
                tracing::debug!(peer = ?peer, "closing an idle connection to make room");
                cut_at = Some(Instant::now() + RECLAIM_GRACE);
                if !draining {
                    draining = true;
                    shutdown(http.as_mut());
                }
            }
            _ = conn.changed.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {
                if cut_at.is_some_and(|cut| Instant::now() >= cut) {
                    tracing::debug!(peer = ?peer, "connection closed to make room did not finish in time");
                    return Ended::Cut;
                }
                if let Some(why) = conn.expired() {
                    let shut_window = why == Expiry::ClientNotReading && conn.signals.h2.load(Ordering::Acquire);
                    if shut_window {
                        h2_abuse::report(peer, Abuse::ZeroWindow);
                    } else {
                        tracing::info!(peer = ?peer, "closing connection: {why}");
                    }
                    return Ended::Cut;
                }
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                shutdown(http.as_mut());
            }
        }
    }
}

/// Answers a connection the table could not admit: a 503 with
/// `Retry-After` to whatever it asks (over TLS once the handshake is done),
/// then closes, HTTP/2 with a GOAWAY, so a client that already sent its
/// request learns it was not served instead of seeing a reset.
async fn refuse(stream: TcpStream, tls: Option<TlsAcceptor>, limits: Limits, why: Refused, _slot: RefusalSlot) {
    let answer = async {
        match tls {
            None => answer_refused(TokioIo::new(stream), why).await,
            Some(acceptor) => {
                if let Ok(s) = acceptor.accept(stream).await {
                    answer_refused(TokioIo::new(s), why).await;
                }
            }
        }
    };
    let _ = tokio::time::timeout(limits.handshake_timeout + limits.first_request_timeout, answer).await;
}

async fn answer_refused<I>(io: I, why: Refused)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let asked = Arc::new(Notify::new());
    let service = {
        let asked = asked.clone();
        service_fn(move |_req| {
            asked.notify_one();
            async move { Ok::<_, std::convert::Infallible>(refusal_response(why)) }
        })
    };
    let mut builder = auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // One answer, then the connection closes.
    builder.http1().timer(TokioTimer::new()).keep_alive(false);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(4);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = asked.notified() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

fn refusal_response(why: Refused) -> hyper::Response<Body> {
    let e = crate::registry::errors::RegistryError::unavailable(format!(
        "regmirror is at its connection limit ({why}); retry shortly"
    ));
    let e = e.with_header(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    let mut resp = e.into_response();
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        http::HeaderValue::from_static("registry/2.0"),
    );
    resp
}

/// A place among the [`REFUSAL_SLOTS`]; given back on drop.
struct RefusalSlot(Arc<AtomicUsize>);

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every open connection, in both listeners, with what admission needs to
/// know to pick one that may make room (`admission`).
struct ConnTable {
    limits: Limits,
    policy: Policy,
    inner: Mutex<TableInner>,
    /// Woken whenever the table becomes empty (for shutdown).
    emptied: Notify,
    /// Refused connections being answered now (at most [`REFUSAL_SLOTS`]).
    refusing: Arc<AtomicUsize>,
}

#[derive(Default)]
struct TableInner {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    per_client: HashMap<IpAddr, usize>,
}

/// A connection as the table sees it. What it is doing is read from its
/// [`Signals`], and only when the table is under pressure: requests do not
/// take the table's lock.
struct Entry {
    ip: IpAddr,
    /// Shared with the connection; not the `Conn` itself, whose drop (which
    /// removes the entry, taking the table's lock) must never run while
    /// admission holds that lock.
    signals: Arc<Signals>,
}

impl ConnTable {
    fn new(limits: Limits) -> Self {
        ConnTable {
            policy: Policy {
                max_connections: limits.max_connections,
                share: limits.max_connections_per_client,
            },
            limits,
            inner: Mutex::new(TableInner::default()),
            emptied: Notify::new(),
            refusing: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection from `ip`, closing an idle one to make
    /// room when the table is under pressure, or refuses it when none may
    /// go (the rules are `admission`'s).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Arc<Conn>, Refused> {
        let ip = ip.to_canonical();
        let mut t = self.lock();
        let own = t.per_client.get(&ip).copied().unwrap_or(0);
        let pressure = self.policy.pressure(t.conns.len(), own);
        if pressure != Pressure::None {
            let inner = &*t;
            let candidates = inner.conns.iter().map(|(id, e)| Candidate {
                id: *id,
                ip: e.ip,
                activity: e.signals.activity(),
            });
            match admission::decide(pressure, ip, &inner.per_client, Instant::now(), candidates) {
                Decision::Admit => {}
                Decision::Replace(victim) => t.reclaim(victim),
                Decision::Refuse(why) => return Err(why),
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let signals = Arc::new(Signals {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served_any: AtomicBool::new(false),
            last_progress_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_at_rest: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            reclaimed: Notify::new(),
            abuse: AbuseMark::default(),
        });
        let conn = Arc::new(Conn {
            id,
            table: self.clone(),
            signals: signals.clone(),
            with_client: AtomicUsize::new(0),
            armed_ms: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        });
        t.conns.insert(id, Entry { ip, signals });
        *t.per_client.entry(ip).or_insert(0) += 1;
        Ok(conn)
    }

    /// A place to answer one refused connection, if there is one.
    fn refusal_slot(&self) -> Option<RefusalSlot> {
        let taken = self.refusing.fetch_add(1, Ordering::AcqRel);
        let slot = RefusalSlot(self.refusing.clone());
        (taken < REFUSAL_SLOTS).then_some(slot)
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
    /// Takes `id` out of the table at once (its slot is free for the
    /// connection being admitted) and tells its task to close.
    fn reclaim(&mut self, id: u64) {
        if let Some(e) = self.forget(id) {
            e.signals.reclaimed.notify_one();
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

/// What the table reads of a connection to decide whether it may make
/// room, shared by the connection, its requests and its table entry.
struct Signals {
    started: Instant,
    /// Requests whose response hyper has not finished with.
    in_flight: AtomicUsize,
    served_any: AtomicBool,
    /// Milliseconds after `started` of the last sign of life: handshake
    /// done, a request begun or ended, a chunk handed to hyper or taken off.
    last_progress_ms: AtomicU64,
    /// Bytes read from the socket, TLS records included: a connection that
    /// has sent something is a client speaking, not a silent socket.
    bytes_in: AtomicU64,
    /// `bytes_in` when the last request ended: more since then is the next
    /// HTTP/1 request arriving, so the connection is no longer idle.
    bytes_at_rest: AtomicU64,
    /// HTTP/2 (ALPN, or the h2c preface): its client's PINGs and window
    /// updates are not requests, and closing it sends a GOAWAY that still
    /// answers a request already sent.
    h2: AtomicBool,
    /// Tells the connection task the table closed it to make room.
    reclaimed: Notify,
    /// The HTTP/2 abuse the connection is being cut off for, if any.
    abuse: AbuseMark,
}

impl Signals {
    fn last_progress(&self) -> Instant {
        self.started + Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed))
    }

    /// Idle only when closing it loses nothing a client sent: a socket
    /// that never sent a byte, or one that finished a request and has
    /// neither a request in flight nor (HTTP/1) the bytes of the next one.
    /// Mid-handshake and mid-request are busy.
    fn activity(&self) -> Activity {
        let bytes = self.bytes_in.load(Ordering::Acquire);
        if !self.served_any.load(Ordering::Acquire) {
            return if bytes == 0 {
                Activity::Silent { since: self.started }
            } else {
                Activity::Busy
            };
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Activity::Busy;
        }
        if !self.h2.load(Ordering::Acquire) && bytes != self.bytes_at_rest.load(Ordering::Acquire) {
            return Activity::Busy;
        }
        Activity::Idle {
            since: self.last_progress(),
        }
    }
}

/// The client's socket, counting what it sends (see [`Signals::bytes_in`]).
struct Counted {
    inner: TcpStream,
    signals: Arc<Signals>,
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            let earlier = this.signals.bytes_in.fetch_add(read.len() as u64, Ordering::AcqRel);
            if earlier == 0 && read.starts_with(b"PRI * HTTP/2") {
                this.signals.h2.store(true, Ordering::Release);
            }
        }
        polled
    }
}

/// `AsyncWrite` for a read-side wrapper (`$ty<..>` with field `inner`):
/// every write goes straight to the wrapped stream.
macro_rules! writes_pass_through {
    (impl$([$($g:tt)*])? for $ty:ty) => {
        impl$(<$($g)*>)? AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}
use writes_pass_through;

writes_pass_through!(impl for Counted);

/// One connection's state, shared by its task, its requests and their
/// response bodies. Dropped (and so removed from the table) when the last
/// of them goes.
struct Conn {
    id: u64,
    table: Arc<ConnTable>,
    signals: Arc<Signals>,
    /// In-flight responses whose last chunk hyper holds and has not sent on:
    /// the client is not reading (or its flow-control window is shut).
    with_client: AtomicUsize,
    /// When the connection task's timer fires (milliseconds after
    /// `started`; `u64::MAX` before it is first set).
    armed_ms: AtomicU64,
    /// Wakes the connection task when its deadline moved before its timer.
    changed: Notify,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.remove(self.id);
    }
}

impl Conn {
    fn touch(&self) {
        let ms = u64::try_from(self.signals.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.signals.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    fn last_progress(&self) -> Instant {
        self.signals.last_progress()
    }

    /// The connection task's timer is set for `at`.
    fn arm(&self, at: Instant) {
        let ms = u64::try_from(at.saturating_duration_since(self.signals.started).as_millis()).unwrap_or(u64::MAX);
        self.armed_ms.store(ms, Ordering::Release);
    }

    /// Wakes the connection task when the deadline is now earlier than its
    /// timer. A later deadline needs no wake-up: the timer fires, finds the
    /// connection not yet expired, and is set again. (Waking the task at the
    /// end of every request was a few percent of a warm manifest's CPU.)
    fn deadline_moved(&self) {
        let Some(deadline) = self.deadline() else { return };
        let armed = self.armed_ms.load(Ordering::Acquire);
        let due =
            u64::try_from(deadline.saturating_duration_since(self.signals.started).as_millis()).unwrap_or(u64::MAX);
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
        let s = &self.signals;
        if !s.served_any.load(Ordering::Acquire) {
            Some(self.last_progress() + limits.first_request_timeout)
        } else if s.in_flight.load(Ordering::Acquire) == 0 || self.with_client.load(Ordering::Acquire) > 0 {
            Some(self.last_progress() + limits.idle_timeout)
        } else {
            None
        }
    }

    /// Why the connection is to be closed now, if it is.
    fn expired(&self) -> Option<Expiry> {
        let deadline = self.deadline()?;
        if Instant::now() < deadline {
            return None;
        }
        Some(if !self.signals.served_any.load(Ordering::Acquire) {
            Expiry::NoFirstRequest
        } else if self.signals.in_flight.load(Ordering::Acquire) == 0 {
            Expiry::Idle
        } else {
            Expiry::ClientNotReading
        })
    }
}

/// Why a connection ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    NoFirstRequest,
    Idle,
    /// A response waits for the client, which read nothing (over HTTP/2: a
    /// window held shut).
    ClientNotReading,
}

impl std::fmt::Display for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expiry::NoFirstRequest => "no request within limits.first_request_timeout",
            Expiry::Idle => "idle for limits.idle_timeout",
            Expiry::ClientNotReading => "client read nothing for limits.idle_timeout",
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
        conn.signals.served_any.store(true, Ordering::Release);
        conn.signals.in_flight.fetch_add(1, Ordering::AcqRel);
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
        let s = &self.conn.signals;
        // Before `in_flight` drops, so that the table never sees the
        // connection idle with a stale mark.
        s.bytes_at_rest
            .store(s.bytes_in.load(Ordering::Acquire), Ordering::Release);
        if s.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
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
