//! Listeners and connections: TLS (SNI picks the leaf certificate) and plain
//! HTTP, each speaking HTTP/1.1 and HTTP/2, with graceful shutdown.
//!
//! The accept loop never waits on a client: the TLS handshake runs in the
//! connection's own task under a deadline, and connections beyond the cap
//! are closed at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::registry::{handle, App, ConnInfo};
use crate::tls::LeafIssuer;

pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight responses may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 4096;

pub struct Listeners {
    pub https: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(https: Option<SocketAddr>, http: Option<SocketAddr>) -> std::io::Result<Self> {
        let bind = |a: SocketAddr| async move {
            TcpListener::bind(a)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))
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

    let (stop_tx, stop_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut loops = Vec::new();
    if let Some(l) = listeners.https {
        tracing::info!(addr = %l.local_addr()?, "TLS listener ready");
        loops.push(tokio::spawn(accept_loop(
            l,
            Some(acceptor.clone()),
            app.clone(),
            graceful.clone(),
            limit.clone(),
            stop_rx.clone(),
        )));
    }
    if let Some(l) = listeners.http {
        tracing::info!(addr = %l.local_addr()?, "plain HTTP listener ready");
        loops.push(tokio::spawn(accept_loop(
            l,
            None,
            app.clone(),
            graceful.clone(),
            limit.clone(),
            stop_rx.clone(),
        )));
    }
    shutdown.await;
    tracing::info!("shutting down: no new connections; letting open ones finish");
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        return Ok(());
    };
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; cutting remaining connections"),
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    graceful: Arc<GracefulShutdown>,
    limit: Arc<Semaphore>,
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                Some(acceptor) => {
                    let tls_stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let sni = tls_stream.get_ref().1.server_name().map(|s| s.to_ascii_lowercase());
                    let conn = ConnInfo {
                        sni,
                        tls: true,
                        peer: Some(peer),
                    };
                    serve(TokioIo::new(tls_stream), app, conn, watcher).await;
                }
                None => {
                    let conn = ConnInfo {
                        sni: None,
                        tls: false,
                        peer: Some(peer),
                    };
                    serve(TokioIo::new(stream), app, conn, watcher).await;
                }
            }
        });
    }
}

async fn serve<I>(io: I, app: Arc<App>, conn: ConnInfo, watcher: hyper_util::server::graceful::Watcher)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let service = service_fn(move |req| {
        let app = app.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(app, conn, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // Generous transport limits; the handler enforces the real one
        // (`MAX_HEADER_BYTES`) so that clients get an OCI error body.
        .max_buf_size(256 * 1024)
        .max_headers(200)
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .max_concurrent_streams(256)
        .max_header_list_size(256 * 1024);
    if let Err(e) = watcher.watch(builder.serve_connection(io, service)).await {
        tracing::debug!(peer = ?peer, error = %e, "connection ended with an error");
    }
}
