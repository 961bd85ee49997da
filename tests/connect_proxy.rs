//! The CONNECT proxy listener's rules, on raw sockets so that every status
//! line and close is seen as sent: what is intercepted, what is tunnelled
//! untouched (directly and through an egress proxy), what is refused and
//! how, who may use the listener at all, and that silent sockets on it do
//! not lock anyone out. The client pulls of e2e_connect.rs cover what a
//! served tunnel does for real clients.
//!
//! regmirror runs as its own process in front of an in-process fake
//! upstream. Client source addresses are 127.254.x.y, which no other test
//! uses.

mod common;

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemons::Tinyproxy;
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS, GHCR_HOSTS};
use common::wire::{accept_queue, client_config, fd_count, raise_nofile, read_response, tcp_from, Response};
use common::{alloc_ip, tempdir};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER: &str = "registry-1.docker.io";

fn src(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 254, c, d))
}

/// regmirror with a CONNECT listener (and `extra_toml` appended) in front
/// of a fake upstream serving docker.io and ghcr.io, holding one manifest.
struct Stack {
    rt: tokio::runtime::Runtime,
    fake: fake_upstream::FakeUpstream,
    rm: Regmirror,
    /// `/v2/library/connect/manifests/<digest>`
    path: String,
}

impl Stack {
    fn start(extra_toml: &str, edit: impl FnOnce(Config) -> Config) -> Stack {
        common::init_crypto();
        let rt = common::runtime();
        let fake = rt.block_on(fake_upstream::FakeUpstream::start(&format!("{}:0", alloc_ip())));
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let digest = fake.add_manifest("library/connect", Some("1"), MANIFEST_TYPE, body);
        let mut cfg = Config::new(alloc_ip())
            .with_connect()
            .with_upstream(UpstreamEntry::new("docker.io", DOCKER_HOSTS, &fake.url(), "dockerhub"))
            .with_upstream(UpstreamEntry::new("ghcr.io", GHCR_HOSTS, &fake.url(), "ghcr"));
        cfg.extra_toml = extra_toml.to_string();
        let rm = Regmirror::start(edit(cfg));
        let path = format!("/v2/library/connect/manifests/{digest}");
        Stack { rt, fake, rm, path }
    }

    fn proxy(&self) -> SocketAddr {
        self.rm.config.connect.expect("CONNECT listener")
    }

    /// `CONNECT target` from `from` with `headers` (each `Name: value\r\n`);
    /// the socket and regmirror's answer.
    fn connect(&self, from: IpAddr, target: &str, headers: &str) -> std::io::Result<(TcpStream, Response)> {
        self.rt.block_on(connect(from, self.proxy(), target, headers))
    }

    /// A CONNECT to docker.io, TLS inside with `sni`, and a GET of the
    /// cached manifest: its status, or the error that stopped it.
    fn get_through_tunnel(&self, from: IpAddr, target: &str, sni: &str) -> Result<u16, String> {
        self.rt.block_on(async {
            let (tcp, answer) = connect(from, self.proxy(), target, "")
                .await
                .map_err(|e| format!("CONNECT: {e}"))?;
            if answer.status != 200 {
                return Err(format!("CONNECT answered {}", answer.status));
            }
            let r = tls_get(tcp, &self.rm.ca_pem, sni, &self.path)
                .await
                .map_err(|e| format!("in the tunnel: {e}"))?;
            Ok(r.status)
        })
    }
}

/// Sends a CONNECT and reads the answer's head (and body, if it has one).
async fn connect(
    from: IpAddr,
    proxy: SocketAddr,
    target: &str,
    headers: &str,
) -> std::io::Result<(TcpStream, Response)> {
    let mut s = tcp_from(from, proxy).await?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n").as_bytes())
        .await?;
    let r = read_response(&mut s, &mut Vec::new()).await?;
    Ok((s, r))
}

/// TLS over `io` naming `sni`, then one HTTP/1.1 GET of `path`.
async fn tls_get<S>(io: S, ca: &Path, sni: &str, path: &str) -> std::io::Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, b"http/1.1"));
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    let mut tls = connector.connect(name, io).await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nAccept: {MANIFEST_TYPE}\r\n\r\n").as_bytes())
        .await?;
    read_response(&mut tls, &mut Vec::new()).await
}

/// The sum of the metric lines starting with `prefix` (0 when none).
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until regmirror's log has a line containing every one of `words`.
#[track_caller]
fn assert_logged(rm: &Regmirror, words: &[&str]) {
    let found = common::wait_until(Duration::from_secs(5), || {
        rm.log().lines().any(|l| words.iter().all(|w| l.contains(w)))
    });
    assert!(found, "no log line with {words:?}:\n{}", rm.log());
}

/// Whether the server closed `s` (EOF or reset) within `within`, having
/// sent nothing.
fn closed_silently(rt: &tokio::runtime::Runtime, s: &mut TcpStream, within: Duration) -> bool {
    rt.block_on(async {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    })
}

// ------------------------------------------------------------- intercepted

/// A CONNECT to a mirrored host is answered 200 and the tunnel is served
/// with that host's leaf from regmirror's CA; a ClientHello in the tunnel
/// naming another mirrored host is refused (the TLS handshake fails, and
/// the log says why), so the CONNECT target alone picks the upstream.
#[test]
fn a_tunnel_is_served_for_its_connect_target_and_no_other_name() {
    let s = Stack::start("", |c| c);
    let target = format!("{DOCKER}:443");
    assert_eq!(
        s.get_through_tunnel(src(0, 1), &target, DOCKER),
        Ok(200),
        "{}",
        s.rm.log()
    );
    assert_eq!(s.fake.count("GET", &s.path), 1, "the first GET reached upstream once");
    // Upper case in the CONNECT target is the same host.
    assert_eq!(
        s.get_through_tunnel(src(0, 1), "REGISTRY-1.Docker.IO:443", DOCKER),
        Ok(200)
    );
    assert_eq!(s.fake.count("GET", &s.path), 1, "the second GET was a cache hit");

    let other = s.get_through_tunnel(src(0, 1), &target, "ghcr.io");
    assert!(
        other.is_err(),
        "SNI ghcr.io in a tunnel to {target} was served: {other:?}"
    );
    assert_logged(&s.rm, &["CONNECT tunnel refused", "differs from the CONNECT target"]);
    let m = s.rm.metrics();
    assert_eq!(
        metric(&m, "regmirror_connect_requests_total{outcome=\"intercepted\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "regmirror_listener_requests_total{listener=\"connect\"}"),
        2.0,
        "{m}"
    );
}

// ----------------------------------------------------------------- refused

/// Not an open proxy: a host regmirror does not mirror, a mirrored host on
/// another port and any port but 443 are refused with 403 and a log line;
/// a plain-HTTP proxy request gets 405 with `Allow: CONNECT`; a malformed
/// target gets 400. Nothing is dialled for any of them.
#[test]
fn other_targets_ports_and_plain_proxy_requests_are_refused() {
    let s = Stack::start("", |c| c);
    for (target, why) in [
        ("example.com:443".to_string(), "not in connect.passthrough"),
        ("127.0.0.9:443".to_string(), "not in connect.passthrough"),
        (format!("{DOCKER}:8443"), "port not allowed"),
        ("ghcr.io:22".to_string(), "port not allowed"),
    ] {
        let target = target.as_str();
        let (_, r) = s.connect(src(1, 1), target, "").expect("CONNECT answered");
        assert_eq!(r.status, 403, "CONNECT {target}: {r:?}");
        assert!(
            String::from_utf8_lossy(&r.body).contains(why),
            "CONNECT {target}: {r:?}"
        );
        assert_logged(&s.rm, &["CONNECT refused", target, why]);
    }
    let (_, r) = s.connect(src(1, 1), "ghcr.io", "").expect("CONNECT answered");
    assert_eq!(r.status, 400, "CONNECT without a port: {r:?}");

    let r = s.rt.block_on(async {
        let mut c = tcp_from(src(1, 1), s.proxy()).await.expect("connect");
        c.write_all(format!("GET http://{DOCKER}/v2/ HTTP/1.1\r\nHost: {DOCKER}\r\n\r\n").as_bytes())
            .await
            .expect("send");
        read_response(&mut c, &mut Vec::new()).await.expect("an answer")
    });
    assert_eq!(r.status, 405, "GET http://…: {r:?}");
    assert_eq!(r.header("allow"), Some("CONNECT"), "{r:?}");
    assert_logged(&s.rm, &["only CONNECT is served"]);

    let m = s.rm.metrics();
    assert_eq!(
        metric(&m, "regmirror_connect_requests_total{outcome=\"refused\"}"),
        6.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "regmirror_connect_requests_total{outcome=\"passthrough\"}"),
        0.0,
        "{m}"
    );
    assert!(
        s.fake.seen().is_empty(),
        "a refused CONNECT reached upstream: {:?}",
        s.fake.seen()
    );
}

/// `[access] allow` applies: a client outside it is closed without an
/// answer (and counted), one inside is served.
#[test]
fn a_client_outside_access_allow_is_refused() {
    // 127.0.0.1: the harness's own readiness and metrics requests.
    let s = Stack::start("[access]\nallow = [\"127.254.2.1\", \"127.0.0.1\"]\n", |c| c);
    let target = format!("{DOCKER}:443");
    assert_eq!(s.get_through_tunnel(src(2, 1), &target, DOCKER), Ok(200));
    let outside = s.connect(src(2, 2), &target, "");
    assert!(
        outside.is_err(),
        "a client outside [access] allow got an answer: {:?}",
        outside.map(|(_, r)| r)
    );
    assert_logged(&s.rm, &["127.254.2.2", "not in [access] allow"]);
    assert_eq!(metric(&s.rm.metrics(), "regmirror_connections_refused_total"), 1.0);
}

/// `[connect] htpasswd`, or `proxy_auth = true` with the private
/// registry's own logins (`[[local]] htpasswd`): no `Proxy-Authorization`
/// or a wrong one gets 407 with `Proxy-Authenticate: Basic`; the right
/// login opens the tunnel.
#[test]
fn proxy_authorization_is_required_and_checked_when_configured() {
    let dir = tempdir("connect-htpasswd-");
    let htpasswd = dir.path().join("htpasswd");
    common::push::write_htpasswd(&htpasswd, &[common::push::CI]);
    let file = format!("{:?}", htpasswd.display().to_string());
    for (what, toml) in [
        ("connect.htpasswd", format!("[connect]\nhtpasswd = {file}\n")),
        (
            "proxy_auth with the [[local]] logins",
            format!("[connect]\nproxy_auth = true\n\n[[local]]\nnamespace = \"team\"\nhtpasswd = {file}\n"),
        ),
    ] {
        check_proxy_authorization(what, &toml);
    }
}

fn check_proxy_authorization(what: &str, toml: &str) {
    let s = Stack::start(toml, |c| c);
    let target = format!("{DOCKER}:443");
    let basic = |user: &str, pw: &str| {
        use base64::Engine;
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    };
    for (sent, headers) in [
        ("no Proxy-Authorization", String::new()),
        ("a wrong password", basic(common::push::CI.0, "wrong")),
        ("an unknown user", basic("nobody", common::push::CI.1)),
        ("a Bearer token", "Proxy-Authorization: Bearer abc\r\n".to_string()),
    ] {
        let (_, r) = s.connect(src(3, 1), &target, &headers).expect("CONNECT answered");
        assert_eq!(r.status, 407, "{what}, {sent}: {r:?}");
        assert_eq!(
            r.header("proxy-authenticate"),
            Some("Basic realm=\"regmirror\""),
            "{what}, {sent}: {r:?}"
        );
    }
    assert_logged(&s.rm, &["CONNECT refused", "no Proxy-Authorization"]);
    assert_logged(&s.rm, &["CONNECT refused", "wrong Proxy-Authorization"]);

    let (tcp, r) = s
        .connect(src(3, 1), &target, &basic(common::push::CI.0, common::push::CI.1))
        .expect("CONNECT answered");
    assert_eq!(r.status, 200, "{what}, the right login: {r:?}");
    let got = s.rt.block_on(tls_get(tcp, &s.rm.ca_pem, DOCKER, &s.path));
    assert_eq!(got.map(|r| r.status).ok(), Some(200), "{what}");
}

// ------------------------------------------------------------- passthrough

/// An echo server: every connection gets back exactly what it sent.
struct Echo {
    addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn echo(rt: &tokio::runtime::Runtime) -> Echo {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(SocketAddr::new(alloc_ip(), 0)))
        .expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    rt.spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Echo { addr, accepted }
}

/// Sends `data` into an open tunnel and reads as many bytes back (a
/// tunnel through tinyproxy does not survive a half-close, so the socket
/// stays open for the caller).
async fn round_trip(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; data.len()];
    let (sent, got) = tokio::join!(w.write_all(data), r.read_exact(&mut back));
    sent?;
    got?;
    Ok(back)
}

/// Every file under the cache directory (content, records, temporaries).
fn store_files(rm: &Regmirror) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(&rm.cache_dir, &mut out);
    out.sort();
    out
}

/// A `connect.passthrough` host (matched by glob, resolved through
/// `[resolver] overrides`, on a port of `passthrough_ports`) is tunnelled
/// byte-for-byte: 1 MiB that starts like a TLS ClientHello comes back
/// unchanged, and neither the cache nor the request log nor the request
/// metrics see any of it. A passthrough host on a port not listed is
/// refused, and an unreachable one is answered 502.
#[test]
fn a_passthrough_host_is_tunnelled_untouched_and_unseen_by_the_cache() {
    let rt = common::runtime();
    let e = echo(&rt);
    let port = e.addr.port();
    let s = Stack::start(
        &format!("[connect]\npassthrough = [\"*.files.test\"]\npassthrough_ports = [{port}]\n"),
        |c| {
            c.with_override("blobs.files.test", e.addr.ip())
                .with_override("gone.files.test", IpAddr::from([127, 0, 0, 9]))
        },
    );
    let before = store_files(&s.rm);

    let mut data = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec();
    data.extend(fake_upstream::bytes_for("passthrough", 1024 * 1024));
    let (mut tcp, r) = s
        .connect(src(4, 1), &format!("blobs.files.test:{port}"), "")
        .expect("CONNECT answered");
    assert_eq!(r.status, 200, "{r:?}");
    let (back, extra) = s.rt.block_on(async {
        let back = round_trip(&mut tcp, &data)
            .await
            .expect("round trip through the tunnel");
        // Half-closed, the tunnel passes the close on and adds nothing.
        tcp.shutdown().await.expect("half-close");
        let mut extra = Vec::new();
        tcp.read_to_end(&mut extra).await.expect("read to the close");
        (back, extra)
    });
    assert!(back == data, "the tunnel changed the bytes");
    assert!(extra.is_empty(), "{} bytes more than were sent came back", extra.len());
    assert_eq!(e.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_logged(&s.rm, &["CONNECT passthrough", &format!("blobs.files.test:{port}")]);

    let (_, r) = s.connect(src(4, 1), "blobs.files.test:444", "").expect("answered");
    assert_eq!(r.status, 403, "a passthrough host on a port not listed: {r:?}");
    let (_, r) = s
        .connect(src(4, 1), &format!("files.test:{port}"), "")
        .expect("answered");
    assert_eq!(r.status, 403, "*.files.test does not match files.test: {r:?}");
    let (_, r) = s
        .connect(src(4, 1), &format!("gone.files.test:{port}"), "")
        .expect("answered");
    assert_eq!(r.status, 502, "an unreachable passthrough host: {r:?}");

    let m = s.rm.metrics();
    assert_eq!(
        metric(&m, "regmirror_connect_requests_total{outcome=\"passthrough\"}"),
        1.0,
        "{m}"
    );
    // Only the harness's own `/metrics` requests (no upstream) are counted.
    assert!(
        !m.lines()
            .any(|l| l.starts_with("regmirror_requests_total{") && !l.contains("upstream=\"-\"")),
        "a passthrough tunnel counted as registry requests:\n{m}"
    );
    assert!(
        !m.contains("regmirror_listener_requests_total{listener=\"connect\"}"),
        "a passthrough tunnel counted as requests:\n{m}"
    );
    assert_eq!(store_files(&s.rm), before, "the store changed");
    assert!(
        !s.rm.log().lines().any(|l| l.contains("listener=connect")),
        "a passthrough tunnel in the request log"
    );
    assert!(s.fake.seen().is_empty(), "upstream saw {:?}", s.fake.seen());
}

/// With `HTTPS_PROXY` in regmirror's environment, passthrough tunnels go
/// through that egress proxy (Debian's tinyproxy), which sees the CONNECT;
/// with the target in `NO_PROXY` they go direct.
#[test]
fn passthrough_goes_through_the_egress_proxy_unless_no_proxy_names_the_host() {
    let rt = common::runtime();
    let e = echo(&rt);
    let port = e.addr.port();
    let tiny = Tinyproxy::start(alloc_ip(), 3128, &[port]);
    let target = e.addr.to_string();
    let through = |no_proxy: Option<&str>| {
        let s = Stack::start(
            &format!(
                "[connect]\npassthrough = [\"{}\"]\npassthrough_ports = [{port}]\n",
                e.addr.ip()
            ),
            |mut c| {
                c.env.push(("HTTPS_PROXY".into(), format!("http://{}", tiny.addr)));
                if let Some(n) = no_proxy {
                    c.env.push(("NO_PROXY".into(), n.into()));
                }
                c
            },
        );
        let (mut tcp, r) = s.connect(src(5, 1), &target, "").expect("CONNECT answered");
        assert_eq!(r.status, 200, "{r:?}\n{}", s.rm.log());
        let back =
            s.rt.block_on(round_trip(&mut tcp, b"through the egress proxy"))
                .expect("round trip");
        assert_eq!(back, b"through the egress proxy");
    };
    through(None);
    let connects = tiny.connects();
    assert!(
        connects.iter().any(|t| t.starts_with(&format!("{target} "))),
        "the passthrough tunnel did not go through tinyproxy: {connects:?}"
    );
    let n = connects.len();
    through(Some(&e.addr.ip().to_string()));
    assert_eq!(
        tiny.connects().len(),
        n,
        "NO_PROXY did not bypass tinyproxy: {:?}",
        tiny.connects()
    );
    assert_eq!(e.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

// ------------------------------------------------------------ idle sockets

/// A client that opens the CONNECT listener and sends nothing is closed at
/// `limits.handshake_timeout`, as on the other listeners.
#[test]
fn a_silent_socket_on_the_connect_listener_is_closed() {
    let s = Stack::start("[limits]\nhandshake_timeout = \"1s\"\n", |c| c);
    let mut silent = s.rt.block_on(tcp_from(src(6, 1), s.proxy())).expect("connect");
    let started = Instant::now();
    assert!(
        closed_silently(&s.rt, &mut silent, Duration::from_secs(10)),
        "a silent socket was never closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    assert_logged(&s.rm, &["no request within limits.handshake_timeout"]);
}

/// 4,000 silent sockets on the CONNECT listener from one address, default
/// `[limits]`: another client's CONNECT, handshake and GET are served
/// within a second.
#[test]
fn four_thousand_idle_connect_sockets_do_not_lock_out_another_client() {
    const FLOOD: usize = 4000;
    raise_nofile(20_000);
    let s = Stack::start("", |c| c);
    let target = format!("{DOCKER}:443");
    assert_eq!(s.get_through_tunnel(src(7, 1), &target, DOCKER), Ok(200), "warm-up");
    let pid = s.rm.pid();
    let baseline = fd_count(pid);
    let proxy = s.proxy();
    let flood = s.rt.block_on(async {
        let mut socks = Vec::new();
        for _ in 0..FLOOD {
            let sock = tcp_from(src(7, 2), proxy)
                .await
                .unwrap_or_else(|e| panic!("flood socket: {e}"));
            sock.set_zero_linger().expect("SO_LINGER 0");
            socks.push(sock);
        }
        socks
    });
    let filled = common::wait_until(Duration::from_secs(10), || fd_count(pid) >= baseline + 3800);
    let during = fd_count(pid);
    assert!(filled, "the flood never filled regmirror: {during} descriptors");
    // "Then" a real client: once regmirror has taken every flood socket
    // off its listen queue, so the clock measures the client's own wait.
    let drained = common::wait_until(Duration::from_secs(10), || accept_queue(proxy) == Some(0));
    assert!(drained, "the accept queue never drained: {:?}", accept_queue(proxy));

    let started = Instant::now();
    let real = s.get_through_tunnel(src(7, 3), &target, DOCKER);
    let took = started.elapsed();
    eprintln!(
        "[connect] {FLOOD} silent CONNECT sockets ({during} descriptors held): a real client took {took:?}: {real:?}"
    );
    drop(flood);
    assert_eq!(real, Ok(200));
    assert!(
        took < Duration::from_secs(1),
        "a real client beside the flood took {took:?}"
    );
}
