//! The CONNECT proxy listener (`server.connect`): clients set
//! `HTTPS_PROXY=http://PROXY:3128` instead of pointing registry names at
//! regmirror in /etc/hosts.
//!
//! A `CONNECT host:443` for a name regmirror intercepts (an upstream's host
//! or its own `server.name`) is answered `200` and the tunnel is served
//! exactly as the TLS listener serves that name: a leaf from regmirror's CA,
//! HTTP/1.1 or h2, the same handler. The CONNECT target, never a resolver,
//! picks the upstream, and a ClientHello naming another host in the tunnel
//! is refused: a client cannot ask for one name and be served another.
//!
//! This listener must never be an open proxy by accident: any other target
//! is refused with 403 unless it matches a `[connect] passthrough` pattern,
//! and only those are dialled (through the egress proxy when one is set),
//! tunnelled byte-for-byte and never seen by the cache. Ports other than 443
//! (or `passthrough_ports`) are refused; plain proxy requests
//! (`GET http://…`) get 405. The connection table, `[access]` and the
//! handshake deadline apply as on the other listeners: a socket that sends
//! no CONNECT is a silent socket, reclaimable and timed out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use secrecy::SecretString;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;

use super::{serve_tls, Conn, Counted};
use crate::auth::htpasswd::Htpasswd;
use crate::config::{ConnectPolicy, Settings};
use crate::metrics::{ConnectLabel, METRICS};
use crate::registry::{App, ConnInfo, Listener};
use crate::tls::LeafIssuer;
use crate::upstream::resolve::UpstreamResolver;

/// The most bytes a CONNECT request head may take; real clients send a few
/// hundred (a `Proxy-Authorization` is the largest part).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long dialling a passthrough target (or the egress proxy) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// The realm of the `Proxy-Authenticate` challenge.
const REALM: &str = "regmirror";

/// What the CONNECT listener needs beyond the app: who gets intercepted,
/// what is tunnelled, and how passthrough targets are reached.
pub(super) struct Proxy {
    issuer: Arc<LeafIssuer>,
    /// The TLS listener's config: the leaf is picked by SNI, which is
    /// checked against the CONNECT target before the handshake goes on.
    tls: Arc<rustls::ServerConfig>,
    policy: ConnectPolicy,
    resolver: UpstreamResolver,
    egress: Option<Egress>,
}

impl Proxy {
    pub(super) fn new(settings: &Settings, issuer: Arc<LeafIssuer>, tls: Arc<rustls::ServerConfig>) -> Proxy {
        let egress = Egress::from_env();
        if let Some(e) = &egress {
            tracing::info!(proxy = %e.addr, "CONNECT passthrough goes through the egress proxy (HTTPS_PROXY)");
        }
        if settings.connect_policy.passthrough.iter().any(|p| p == "*") {
            tracing::warn!("connect.passthrough = [\"*\"]: the CONNECT listener tunnels to any host its clients name");
        }
        Proxy {
            issuer,
            tls,
            policy: settings.connect_policy.clone(),
            resolver: UpstreamResolver::new(settings.resolver_overrides.clone()),
            egress,
        }
    }

    /// What to do with a CONNECT to `target`, once the client is known.
    fn route(&self, target: &Target) -> Verdict {
        decide(target, &self.policy, |h| self.issuer.is_allowed(h))
    }

    /// A TCP connection to a passthrough target: through the egress proxy
    /// when one applies, else resolved like upstream names (DNS and
    /// `[resolver] overrides`, never /etc/hosts, which may point at us).
    async fn dial(&self, target: &Target) -> std::io::Result<BufReader<TcpStream>> {
        if let Some(e) = self.egress.as_ref().filter(|e| !e.bypassed(&target.host)) {
            return e.tunnel(target).await;
        }
        let ip = match target.host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => {
                use reqwest::dns::Resolve;
                let name = target
                    .host
                    .parse::<reqwest::dns::Name>()
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", target.host)))?;
                let mut addrs = self.resolver.resolve(name).await.map_err(std::io::Error::other)?;
                addrs
                    .next()
                    .ok_or_else(|| std::io::Error::other(format!("{} has no address", target.host)))?
                    .ip()
            }
        };
        let s = TcpStream::connect(SocketAddr::new(ip, target.port)).await?;
        let _ = s.set_nodelay(true);
        Ok(BufReader::new(s))
    }
}

/// A CONNECT target, `host:port`, host lowercased (IPv6 in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parses CONNECT's authority form; anything else (a path, a scheme,
    /// no port) is a malformed request.
    fn parse(authority: &str) -> Option<Target> {
        let (host, port) = authority.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        let host = host.to_ascii_lowercase();
        let ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            crate::config::valid_hostname(&host) || host.parse::<std::net::Ipv4Addr>().is_ok()
        };
        ok.then_some(Target { host, port })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// What the listener does with a CONNECT.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Terminate TLS for this name and serve it as the TLS listener does.
    Intercept,
    /// Dial the target and copy bytes both ways, unseen.
    Passthrough,
    /// 403, with the reason for the client and the log.
    Refuse(&'static str),
}

/// The routing rules, pure so that they are tested without sockets.
pub(super) fn decide(target: &Target, policy: &ConnectPolicy, intercepted: impl Fn(&str) -> bool) -> Verdict {
    if target.port != 443 && !policy.passthrough_ports.contains(&target.port) {
        return Verdict::Refuse("port not allowed: only 443 (and connect.passthrough_ports) are tunnelled");
    }
    if intercepted(&target.host) {
        return if target.port == 443 {
            Verdict::Intercept
        } else {
            Verdict::Refuse("regmirror serves the hosts it mirrors on port 443 only")
        };
    }
    if policy.passthrough.iter().any(|p| glob_match(p, &target.host)) {
        Verdict::Passthrough
    } else {
        Verdict::Refuse("host not mirrored by regmirror and not in connect.passthrough")
    }
}

/// `*` matches any run of characters (dots included), everything else
/// itself: `*.example.com` is every name under example.com but not
/// example.com itself, and `*` is every host. Both sides are lowercase.
pub(super) fn glob_match(pattern: &str, host: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = host.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A CONNECT request head as read.
#[derive(Debug)]
pub(super) struct Head {
    method: String,
    target: String,
    proxy_authorization: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HeadError {
    #[error("connection closed before a request")]
    Closed,
    #[error("connection closed in the middle of the request head")]
    Truncated,
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request head, leaving whatever the client sent after it (its
/// ClientHello, when it did not wait for our 200) in `io`'s buffer.
async fn read_head<R: AsyncRead + Unpin>(io: &mut BufReader<R>) -> Result<Head, HeadError> {
    let mut head = Vec::new();
    loop {
        let buf = io.fill_buf().await?;
        if buf.is_empty() {
            return Err(if head.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Truncated
            });
        }
        let got = buf.len();
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(buf);
        if let Some(i) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + i + 4;
            io.consume(got - (head.len() - end));
            head.truncate(end);
            if end > MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
            return parse_head(&head);
        }
        io.consume(got);
        if head.len() > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Parses `METHOD TARGET HTTP/1.x` and the header lines.
pub(super) fn parse_head(bytes: &[u8]) -> Result<Head, HeadError> {
    let text = std::str::from_utf8(bytes).map_err(|_| HeadError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut words = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(HeadError::Malformed("request line is not `METHOD TARGET HTTP/1.1`"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HeadError::Malformed("method is not an HTTP token"));
    }
    if target.is_empty() || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(HeadError::Malformed("empty or binary request target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Malformed("not HTTP/1.0 or HTTP/1.1"));
    }
    let mut proxy_authorization = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HeadError::Malformed("header line without a colon"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(HeadError::Malformed("invalid header name"));
        }
        if name.eq_ignore_ascii_case("proxy-authorization") {
            proxy_authorization = Some(value.trim().to_string());
        }
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        proxy_authorization,
    })
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(value: &str) -> Option<(String, SecretString)> {
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), SecretString::from(password.to_string())))
}

/// Whether the CONNECT carries credentials `users` accepts (bcrypt, off the
/// async threads).
async fn authorized(users: &Htpasswd, value: Option<&str>) -> bool {
    let Some((user, password)) = value.and_then(basic_credentials) else {
        return false;
    };
    let users = users.clone();
    tokio::task::spawn_blocking(move || users.verify_blocking(&user, &password))
        .await
        .unwrap_or(false)
}

/// Writes a complete answer to a CONNECT that is not tunnelled, then closes.
async fn answer<W: AsyncWrite + Unpin>(io: &mut W, status: &str, extra: &str, message: &str) {
    let body = format!("{message}\n");
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = io.write_all(text.as_bytes()).await;
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

fn count(outcome: &'static str) {
    METRICS.connect_requests.get_or_create(&ConnectLabel { outcome }).inc();
}

/// One CONNECT connection from accept to close.
pub(super) async fn connection(
    stream: Counted,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    app: Arc<App>,
    conn: Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = conn.table.limits.clone();
    let mut io = BufReader::new(stream);
    // Until the head is in, this is a silent (or slow) socket: the
    // handshake deadline bounds it, and the table may reclaim it.
    let read = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, read_head(&mut io)) => r,
        _ = conn.signals.reclaimed.notified() => {
            tracing::debug!(%peer, "closing a silent CONNECT socket to make room");
            return;
        }
        _ = stop.changed() => return,
    };
    let head = match read {
        Err(_) => {
            tracing::info!(%peer, "closing CONNECT socket: no request within limits.handshake_timeout");
            return;
        }
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(e)) => {
            count("refused");
            tracing::info!(%peer, error = %e, "CONNECT refused: bad request");
            return answer(&mut io, "400 Bad Request", "", &format!("regmirror: {e}")).await;
        }
        Ok(Ok(h)) => h,
    };
    if head.method != "CONNECT" {
        count("refused");
        tracing::info!(%peer, method = %head.method, target = %head.target, "proxy request refused: only CONNECT is served");
        return answer(
            &mut io,
            "405 Method Not Allowed",
            "Allow: CONNECT\r\n",
            "regmirror's proxy listener serves CONNECT only; it does not forward plain-HTTP requests",
        )
        .await;
    }
    if let Some(users) = &proxy.policy.users {
        if !authorized(users, head.proxy_authorization.as_deref()).await {
            count("refused");
            let why = if head.proxy_authorization.is_some() {
                "wrong Proxy-Authorization"
            } else {
                "no Proxy-Authorization"
            };
            tracing::info!(%peer, target = %head.target, "CONNECT refused: {why}");
            return answer(
                &mut io,
                "407 Proxy Authentication Required",
                &format!("Proxy-Authenticate: Basic realm=\"{REALM}\"\r\n"),
                "regmirror: proxy authentication required",
            )
            .await;
        }
    }
    let Some(target) = Target::parse(&head.target) else {
        count("refused");
        tracing::info!(%peer, target = %head.target, "CONNECT refused: target is not host:port");
        return answer(
            &mut io,
            "400 Bad Request",
            "",
            "regmirror: CONNECT needs a host:port target",
        )
        .await;
    };
    match proxy.route(&target) {
        Verdict::Refuse(why) => {
            count("refused");
            tracing::warn!(%peer, %target, "CONNECT refused: {why}");
            answer(
                &mut io,
                "403 Forbidden",
                "",
                &format!("regmirror: CONNECT {target} refused: {why}"),
            )
            .await
        }
        Verdict::Intercept => {
            count("intercepted");
            tracing::debug!(%peer, %target, "CONNECT intercepted");
            intercept(io, peer, target, &proxy, app, conn, stop).await
        }
        Verdict::Passthrough => {
            let upstream = match tokio::time::timeout(DIAL_TIMEOUT, proxy.dial(&target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    count("refused");
                    tracing::warn!(%peer, %target, error = %e, "CONNECT passthrough: cannot reach the target");
                    return answer(
                        &mut io,
                        "502 Bad Gateway",
                        "",
                        &format!("regmirror: cannot reach {target}: {e}"),
                    )
                    .await;
                }
                Err(_) => {
                    count("refused");
                    tracing::warn!(%peer, %target, "CONNECT passthrough: connecting to the target timed out");
                    return answer(
                        &mut io,
                        "504 Gateway Timeout",
                        "",
                        &format!("regmirror: {target} did not answer"),
                    )
                    .await;
                }
            };
            count("passthrough");
            tracing::info!(%peer, %target, "CONNECT passthrough: tunnelling without interception");
            if io
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            tunnel(io, upstream, limits.idle_timeout, &conn, &mut stop).await;
            tracing::debug!(%peer, %target, "CONNECT passthrough closed");
        }
    }
}

/// Serves an intercepted tunnel: TLS with the target's leaf, then the same
/// HTTP service as the TLS listener.
async fn intercept(
    mut io: BufReader<Counted>,
    peer: SocketAddr,
    target: Target,
    proxy: &Proxy,
    app: Arc<App>,
    conn: Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) {
    if io
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let limits = conn.table.limits.clone();
    let handshake = async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let sni = start.client_hello().server_name().map(str::to_ascii_lowercase);
        let config = match sni {
            Some(s) if s == target.host => proxy.tls.clone(),
            Some(s) => return Err(format!("TLS SNI {s:?} differs from the CONNECT target")),
            // No SNI (a client that connects by address): the target's leaf.
            None => target_config(proxy, &target.host)?,
        };
        start
            .into_stream(config)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))
    };
    let tls_stream = tokio::select! {
        done = tokio::time::timeout(limits.handshake_timeout, handshake) => match done {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(why)) => {
                tracing::warn!(%peer, %target, "CONNECT tunnel refused: {why}");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, %target, "CONNECT tunnel: TLS handshake timed out");
                return;
            }
        },
        _ = stop.changed() => return,
    };
    let info = ConnInfo {
        sni: Some(target.host),
        tls: true,
        peer: Some(peer),
        listener: Listener::Connect,
    };
    serve_tls(tls_stream, app, info, conn, stop).await
}

/// A TLS config that presents `host`'s leaf whatever the ClientHello says
/// (it said nothing: no SNI).
fn target_config(proxy: &Proxy, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let leaf = proxy
        .issuer
        .leaf_for(host)
        .ok_or_else(|| format!("no certificate for {host}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(leaf)));
    tls.alpn_protocols = proxy.tls.alpn_protocols.clone();
    Ok(Arc::new(tls))
}

/// Copies bytes both ways until either side closes, nothing moves for
/// `idle` (a tunnel has no requests, so silence is the only idle sign), or
/// shutdown: an opaque tunnel has no request boundary to drain at.
async fn tunnel<A, B>(client: A, upstream: B, idle: Duration, conn: &Conn, stop: &mut watch::Receiver<bool>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || {
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
        conn.touch();
    };
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let pumps = async {
        tokio::join!(pump(&mut cr, &mut uw, &touch), pump(&mut ur, &mut cw, &touch));
    };
    let watchdog = async {
        loop {
            let at = started + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= at {
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    };
    tokio::select! {
        _ = pumps => {}
        _ = watchdog => tracing::debug!("CONNECT passthrough idle for limits.idle_timeout; closing"),
        _ = stop.changed() => {}
    }
}

/// One direction of a tunnel; shuts the write side when the read side ends.
async fn pump<R, W>(r: &mut R, w: &mut W, touch: &impl Fn())
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        touch();
    }
    let _ = w.shutdown().await;
}

/// The egress proxy from `HTTPS_PROXY`/`https_proxy` (as the upstream
/// client honours it), with `NO_PROXY` bypasses.
struct Egress {
    addr: String,
    authorization: Option<String>,
    no_proxy: Vec<String>,
}

impl Egress {
    fn from_env() -> Option<Egress> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let raw = var(&["HTTPS_PROXY", "https_proxy"])?;
        let with_scheme = if raw.contains("://") {
            raw.clone()
        } else {
            format!("http://{raw}")
        };
        let url = match url::Url::parse(&with_scheme) {
            Ok(u) if u.scheme() == "http" && u.host_str().is_some() => u,
            _ => {
                tracing::warn!(value = %raw, "HTTPS_PROXY is not an http:// proxy URL; CONNECT passthrough dials directly");
                return None;
            }
        };
        let host = url.host_str().unwrap_or_default().to_string();
        let addr = format!("{host}:{}", url.port().unwrap_or(80));
        let authorization = (!url.username().is_empty()).then(|| {
            let user = percent_decode(url.username());
            let pass = percent_decode(url.password().unwrap_or(""));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            )
        });
        let no_proxy = var(&["NO_PROXY", "no_proxy"])
            .unwrap_or_default()
            .split(',')
            .map(|s| {
                s.trim()
                    .trim_start_matches("*.")
                    .trim_start_matches('.')
                    .to_ascii_lowercase()
            })
            .filter(|s| !s.is_empty())
            .collect();
        Some(Egress {
            addr,
            authorization,
            no_proxy,
        })
    }

    fn bypassed(&self, host: &str) -> bool {
        self.no_proxy
            .iter()
            .any(|n| n == "*" || host == n || host.ends_with(&format!(".{n}")))
    }

    /// Opens a tunnel to `target` through the egress proxy.
    async fn tunnel(&self, target: &Target) -> std::io::Result<BufReader<TcpStream>> {
        let s = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("egress proxy {}: {e}", self.addr)))?;
        let _ = s.set_nodelay(true);
        let mut io = BufReader::new(s);
        let auth = self
            .authorization
            .as_ref()
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        io.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
            .await?;
        io.flush().await?;
        let mut line = String::new();
        io.read_line(&mut line).await?;
        let ok = line.split(' ').nth(1) == Some("200");
        loop {
            let mut h = String::new();
            if io.read_line(&mut h).await? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        if !ok {
            return Err(std::io::Error::other(format!(
                "egress proxy {} answered {:?}",
                self.addr,
                line.trim_end()
            )));
        }
        Ok(io)
    }
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(passthrough: &[&str], ports: &[u16]) -> ConnectPolicy {
        ConnectPolicy {
            passthrough: passthrough.iter().map(|s| s.to_string()).collect(),
            passthrough_ports: ports.to_vec(),
            users: None,
        }
    }

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("*.example.com", "a.example.com"));
        assert!(glob_match("*.example.com", "a.b.example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(!glob_match("*.example.com", "evilexample.com"));
        assert!(!glob_match("*.example.com", "a.example.com.evil.net"));
        assert!(glob_match("*", "anything.at.all"));
        assert!(glob_match("files.example.com", "files.example.com"));
        assert!(!glob_match("files.example.com", "files.example.co"));
        assert!(glob_match("cdn-*.example.com", "cdn-7.example.com"));
        assert!(!glob_match("cdn-*.example.com", "cdn.example.com"));
        assert!(glob_match("*cdn*", "a.cdn.b"));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn routing_intercepts_mirrored_hosts_and_refuses_the_rest() {
        let mirrored = |h: &str| h == "ghcr.io" || h == "regmirror.local";
        let p = policy(&["*.example.com"], &[8443]);
        assert_eq!(decide(&t("ghcr.io:443"), &p, mirrored), Verdict::Intercept);
        assert_eq!(decide(&t("regmirror.local:443"), &p, mirrored), Verdict::Intercept);
        assert!(matches!(decide(&t("ghcr.io:8443"), &p, mirrored), Verdict::Refuse(_)));
        assert_eq!(decide(&t("files.example.com:443"), &p, mirrored), Verdict::Passthrough);
        assert_eq!(decide(&t("files.example.com:8443"), &p, mirrored), Verdict::Passthrough);
        assert!(matches!(decide(&t("files.example.com:22"), &p, mirrored), Verdict::Refuse(w) if w.contains("port")));
        assert!(matches!(decide(&t("evil.net:443"), &p, mirrored), Verdict::Refuse(w) if w.contains("passthrough")));
        let open = policy(&["*"], &[]);
        assert_eq!(decide(&t("evil.net:443"), &open, mirrored), Verdict::Passthrough);
        assert!(matches!(decide(&t("evil.net:80"), &open, mirrored), Verdict::Refuse(_)));
    }

    #[test]
    fn targets_are_host_and_port() {
        assert_eq!(
            t("GHCR.io:443"),
            Target {
                host: "ghcr.io".into(),
                port: 443
            }
        );
        assert_eq!(t("[::1]:443").host, "[::1]");
        for bad in [
            "ghcr.io",
            "ghcr.io:",
            "ghcr.io:0",
            "ghcr.io:99999",
            "http://ghcr.io:443",
            "/x:443",
            "a b:443",
            ":443",
        ] {
            assert!(Target::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn heads_parse_and_bad_ones_are_errors() {
        let h =
            parse_head(b"CONNECT ghcr.io:443 HTTP/1.1\r\nHost: ghcr.io:443\r\nProxy-Authorization: Basic YTpi\r\n\r\n")
                .unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str()), ("CONNECT", "ghcr.io:443"));
        assert_eq!(h.proxy_authorization.as_deref(), Some("Basic YTpi"));
        let (user, _) = basic_credentials("Basic YTpi").unwrap();
        assert_eq!(user, "a");
        assert!(basic_credentials("Bearer YTpi").is_none());
        assert!(basic_credentials("Basic !!!").is_none());
        for bad in [
            &b"CONNECT ghcr.io:443\r\n\r\n"[..],
            b"CONNECT  ghcr.io:443 HTTP/1.1\r\n\r\n",
            b"connect ghcr.io:443 HTTP/1.1\r\n\r\n",
            b"CONNECT ghcr.io:443 HTTP/2\r\n\r\n",
            b"CONNECT ghcr.io:443 HTTP/1.1\r\nno colon here\r\n\r\n",
            b"CONNECT \xff:443 HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n",
        ] {
            assert!(matches!(parse_head(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_head_is_read_without_eating_what_follows() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"CONNECT quay.io:443 HTTP/1.1\r\nHost: quay.io:443\r\n\r\n\x16\x03\x01hello")
            .await
            .unwrap();
        let mut io = BufReader::with_capacity(7, server);
        let head = read_head(&mut io).await.unwrap();
        assert_eq!(head.target, "quay.io:443");
        let mut rest = [0u8; 8];
        io.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"\x16\x03\x01hello");

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(&vec![b'a'; MAX_HEAD_BYTES + 10]).await.unwrap();
        let mut io = BufReader::new(server);
        assert!(matches!(read_head(&mut io).await, Err(HeadError::TooLarge)));

        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"CONNECT quay.io:443 HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let mut io = BufReader::new(server);
        assert!(matches!(read_head(&mut io).await, Err(HeadError::Truncated)));
    }
}
