//! Fleet-scale serving (issue 27): a NAT'd fleet of CI runners arrives as
//! one client address, and must be served as the crowd it is, not cut down
//! to one client's share while the mirror is otherwise idle; a crowd of
//! silent sockets from one address still never locks anyone else out; and
//! a connection that cannot be admitted is answered (503 with
//! `Retry-After`), never reset after its request was sent.
//!
//! regmirror runs as its own process (`common::regmirror`) in front of an
//! in-process fake upstream. Client source addresses are 127.252.x.y, which
//! no other test uses.

mod common;

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::alloc_ip;
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};
use common::wire::{accept_queue, client_config, fd_count, raise_nofile, read_response, tcp_from, Response};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const SNI: &str = "registry-1.docker.io";

fn src(c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 252, c, d))
}

/// regmirror (with `limits_toml` appended) in front of a fake upstream that
/// holds one manifest, fetched once so it is cached. Returns the runtime the
/// fake runs on (keep it alive), the fake, regmirror and the manifest's path.
fn cached_manifest_stack(
    limits_toml: &str,
) -> (tokio::runtime::Runtime, fake_upstream::FakeUpstream, Regmirror, String) {
    common::init_crypto();
    let rt = common::runtime();
    let fake = rt.block_on(fake_upstream::FakeUpstream::start(&format!("{}:0", alloc_ip())));
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
    let digest = fake.add_manifest("library/fleet", Some("1"), MANIFEST_TYPE, body);
    let mut cfg =
        Config::new(alloc_ip()).with_upstream(UpstreamEntry::new("docker.io", DOCKER_HOSTS, &fake.url(), "dockerhub"));
    cfg.extra_toml = limits_toml.to_string();
    let rm = Regmirror::start(cfg);
    let path = format!("/v2/library/fleet/manifests/{digest}");
    let warm = rt.block_on(async {
        let mut c = TlsClient::connect(src(0, 1), rm.config.https, &rm.ca_pem, b"http/1.1")
            .await
            .expect("connect to warm the cache");
        c.get(&path).await
    });
    assert_eq!(warm.ok().map(|r| r.status), Some(200), "warming the cache with {path}");
    assert_eq!(fake.count("GET", &path), 1, "the warm-up reached upstream once");
    (rt, fake, rm, path)
}

/// A client holding exactly one TLS connection: every request goes over
/// it, and nothing reconnects behind the test's back, so a connection the
/// server closes is a failed request, not a hidden retry.
struct TlsClient {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    async fn connect(from: IpAddr, to: SocketAddr, ca_pem: &Path, alpn: &[u8]) -> std::io::Result<TlsClient> {
        let tcp = tcp_from(from, to).await?;
        let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem, alpn));
        let name = ServerName::try_from(SNI.to_string()).map_err(std::io::Error::other)?;
        let tls = connector.connect(name, tcp).await?;
        Ok(TlsClient { tls, buf: Vec::new() })
    }

    async fn get(&mut self, path: &str) -> std::io::Result<Response> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {SNI}\r\nAccept: {MANIFEST_TYPE}\r\n\r\n");
        self.tls.write_all(req.as_bytes()).await?;
        read_response(&mut self.tls, &mut self.buf).await
    }
}

// ------------------------------------------------------------- the fleet

/// How one fleet connection fared.
#[derive(Debug, Default)]
struct Tally {
    served: usize,
    other_status: Vec<u16>,
    errors: Vec<String>,
}

/// How long any one step of a runner may take before it counts as failed.
const STEP: Duration = Duration::from_secs(60);

/// `n` GETs of `path` on `client`'s one connection; the first failure
/// ends the connection (it is not reopened).
async fn gets(n: usize, client: &mut Option<TlsClient>, path: &str, tally: &mut Tally) {
    for _ in 0..n {
        let Some(c) = client.as_mut() else { return };
        match tokio::time::timeout(STEP, c.get(path)).await {
            Ok(Ok(r)) if r.status == 200 => tally.served += 1,
            Ok(Ok(r)) => {
                tally.other_status.push(r.status);
                *client = None;
            }
            Ok(Err(e)) => {
                tally.errors.push(format!("{:?}: {e}", e.kind()));
                *client = None;
            }
            Err(_) => {
                tally.errors.push("no response".into());
                *client = None;
            }
        }
    }
}

/// One runner's connection: connect, one GET, wait until every runner
/// holds its connection open, then four more GETs on the same connection.
async fn runner(
    from: IpAddr,
    to: SocketAddr,
    ca_pem: Arc<Path>,
    path: Arc<str>,
    all_open: Arc<tokio::sync::Barrier>,
) -> Tally {
    let mut tally = Tally::default();
    let mut client = match tokio::time::timeout(STEP, TlsClient::connect(from, to, &ca_pem, b"http/1.1")).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            tally.errors.push(format!("connect: {:?}: {e}", e.kind()));
            None
        }
        Err(_) => {
            tally.errors.push("connect timed out".into());
            None
        }
    };
    gets(1, &mut client, &path, &mut tally).await;
    all_open.wait().await;
    gets(4, &mut client, &path, &mut tally).await;
    tally
}

/// 600 concurrent TLS connections from one address (a fleet behind NAT),
/// five warm manifest GETs each, default `[limits]`: all 3,000 are served.
/// Every connection makes its first GET, then all 600 are held open at
/// once before the other four, so the server sees 600 connections from
/// one address, more than twice the per-client share.
#[test]
fn a_natd_fleet_of_600_connections_is_served_in_full() {
    const CONNECTIONS: usize = 600;
    raise_nofile(20_000);
    let (rt, fake, rm, path) = cached_manifest_stack("");
    let pid = rm.pid();
    let fleet = src(1, 1);
    let ca: Arc<Path> = Arc::from(rm.ca_pem.as_path());
    let path_arc: Arc<str> = Arc::from(path.as_str());
    let all_open = Arc::new(tokio::sync::Barrier::new(CONNECTIONS + 1));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            rt.spawn(runner(
                fleet,
                rm.config.https,
                ca.clone(),
                path_arc.clone(),
                all_open.clone(),
            ))
        })
        .collect();
    let held = rt.block_on(async {
        all_open.wait().await;
        fd_count(pid)
    });
    let tallies: Vec<Tally> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("runner task"));
        }
        out
    });
    let served: usize = tallies.iter().map(|t| t.served).sum();
    let statuses: Vec<u16> = tallies.iter().flat_map(|t| t.other_status.clone()).collect();
    let errors: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).collect();
    eprintln!(
        "[fleet] {served} of {} served in {:?}; regmirror held {held} descriptors with all {CONNECTIONS} open; \
         other statuses {statuses:?}; {} errors, first: {:?}",
        CONNECTIONS * 5,
        started.elapsed(),
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        served,
        CONNECTIONS * 5,
        "warm manifest GETs served from {CONNECTIONS} connections of one address"
    );
    assert!(
        held >= CONNECTIONS,
        "regmirror held {held} descriptors while all {CONNECTIONS} connections were open"
    );
    assert_eq!(fake.count("GET", &path), 1, "warm GETs never reached upstream");
}

// ---------------------------------------------------------- silent flood

/// 4,200 silent sockets from one address (more than the 4,096 connections
/// the table holds), default `[limits]`, then a real client from another
/// address: it is served, within a second.
#[test]
fn a_silent_flood_from_one_address_does_not_lock_out_another() {
    const FLOOD: usize = 4200;
    raise_nofile(20_000);
    let (rt, _fake, rm, path) = cached_manifest_stack("");
    let pid = rm.pid();
    let baseline = fd_count(pid);
    let https = rm.config.https;
    let flood = rt.block_on(async {
        let mut socks = Vec::new();
        for _ in 0..FLOOD {
            match tcp_from(src(2, 1), https).await {
                Ok(s) => {
                    // Closed with a reset, so that 4,200 TIME_WAITs do not
                    // use up this source address's ports for the next run.
                    s.set_zero_linger().expect("SO_LINGER 0");
                    socks.push(s)
                }
                Err(e) => panic!("flood socket {}: {e}", socks.len()),
            }
        }
        socks
    });
    // The flood is in: regmirror holds (about) as many of them as it lets
    // one address hold before the last share of the table.
    let filled = common::wait_until(Duration::from_secs(10), || fd_count(pid) >= baseline + 3800);
    let during = fd_count(pid);
    assert!(filled, "the flood never filled regmirror: {during} descriptors");
    // "Then" a real client: once regmirror has taken every flood socket
    // off its listen queue, so the clock measures the client's own wait.
    let drained = common::wait_until(Duration::from_secs(10), || accept_queue(https) == Some(0));
    assert!(
        drained,
        "regmirror's accept queue never drained: {:?}",
        accept_queue(https)
    );

    let started = Instant::now();
    let mut handshake = Duration::ZERO;
    let real = rt.block_on(async {
        let mut c = TlsClient::connect(src(2, 2), https, &rm.ca_pem, b"http/1.1").await?;
        handshake = started.elapsed();
        c.get(&path).await
    });
    let took = started.elapsed();
    eprintln!(
        "[fleet] silent flood of {FLOOD}: regmirror held {during} descriptors; a real client took {took:?} \
         ({handshake:?} to its handshake): {:?}",
        real.as_ref().map(|r| r.status)
    );
    drop(flood);
    assert_eq!(
        real.as_ref().map(|r| r.status).ok(),
        Some(200),
        "a real client beside the flood: {real:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "a real client beside the flood took {took:?}"
    );
}

/// Bytes not yet read by the server on each connection to `addr` it has
/// not closed yet (`ss`'s Recv-Q on the server's side).
fn unread_by_server(addr: SocketAddr) -> Option<Vec<u64>> {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "state",
            "close-wait",
            "src",
            &addr.to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        // With two states ss prints the State column first.
        .map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

// -------------------------------------------------------- over the limit

/// Sends half a request head and keeps the socket: a client mid-request.
async fn half_a_request(from: IpAddr, to: SocketAddr) -> TcpStream {
    let mut s = tcp_from(from, to).await.expect("connect");
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: regmirror.test\r\n")
        .await
        .expect("send half a head");
    s
}

fn reqwest_client(from: IpAddr, rm: &Regmirror, h2c: bool) -> reqwest::Client {
    let pem = std::fs::read(&rm.ca_pem).expect("read CA");
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .local_address(from)
        .resolve(SNI, rm.config.https)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA certificate"))
        .timeout(Duration::from_secs(30));
    if h2c {
        b = b.http2_prior_knowledge();
    }
    b.build().expect("reqwest client")
}

/// A table of 8 full of clients mid-request (half a request head each,
/// from two addresses): a ninth connection is answered 503 with
/// `Retry-After`, over plain HTTP/1.1, TLS HTTP/1.1, TLS HTTP/2 and h2c,
/// and the clients mid-request are not closed to make room: each gets its
/// answer once it finishes its head.
#[test]
fn over_the_limit_connections_are_answered_503_not_reset() {
    let (rt, _fake, rm, path) = cached_manifest_stack(
        "[limits]\nmax_connections = 8\nmax_connections_per_client = 4\n\
         handshake_timeout = \"60s\"\nfirst_request_timeout = \"60s\"\n",
    );
    let http = rm.config.http;
    // The warm-up connection is gone first: were it still in the table,
    // the eighth client would find it full and replace the seventh, which
    // regmirror may not have read a byte of yet (a silent socket).
    let alone = common::wait_until(Duration::from_secs(10), || {
        unread_by_server(rm.config.https).is_some_and(|q| q.is_empty())
    });
    assert!(alone, "the warm-up connection was never closed");
    let mut busy = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..8u8 {
            v.push(half_a_request(src(3, 1 + i % 2), http).await);
        }
        v
    });
    // Before anyone else arrives, regmirror has accepted all eight and read
    // what they sent (nothing left unread on its side of any of them), so
    // it knows they are mid-request, not silent.
    let read_all = common::wait_until(Duration::from_secs(10), || {
        accept_queue(http) == Some(0)
            && unread_by_server(http).is_some_and(|q| q.len() == 8 && q.iter().all(|n| *n == 0))
    });
    assert!(
        read_all,
        "regmirror did not take up the eight clients: accept queue {:?}, unread {:?}",
        accept_queue(http),
        unread_by_server(http)
    );

    let newcomer = src(3, 3);
    let mut answers = Vec::new();
    rt.block_on(async {
        // Plain HTTP/1.1, by hand, to see the raw answer.
        let mut s = tcp_from(newcomer, http).await.expect("connect");
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: regmirror.test\r\n\r\n")
            .await
            .expect("send");
        let r = read_response(&mut s, &mut Vec::new()).await;
        answers.push((
            "plain HTTP/1.1",
            r.as_ref().map(|r| r.status).ok(),
            r.as_ref().ok().is_some_and(|r| has_retry_after(&r.head)),
        ));
        // TLS HTTP/1.1.
        let r = async {
            let mut c = TlsClient::connect(newcomer, rm.config.https, &rm.ca_pem, b"http/1.1").await?;
            c.get(&path).await
        }
        .await;
        answers.push((
            "TLS HTTP/1.1",
            r.as_ref().map(|r| r.status).ok(),
            r.as_ref().ok().is_some_and(|r| has_retry_after(&r.head)),
        ));
        // TLS HTTP/2 (ALPN) and h2c, with reqwest.
        for (what, h2c, url) in [
            ("TLS HTTP/2", false, format!("https://{SNI}{path}")),
            ("h2c", true, format!("http://{http}/v2/")),
        ] {
            let r = reqwest_client(newcomer, &rm, h2c).get(&url).send().await;
            match r {
                Ok(r) => {
                    assert_eq!(r.version(), reqwest::Version::HTTP_2, "{what} spoke HTTP/2");
                    let retry = r.headers().contains_key("retry-after");
                    answers.push((what, Some(r.status().as_u16()), retry));
                }
                Err(e) => {
                    eprintln!("[fleet] {what}: {e:?}");
                    answers.push((what, None, false));
                }
            }
        }
    });
    // The clients mid-request finish their heads and are answered.
    let finished = rt.block_on(async {
        let mut ok = 0;
        for s in &mut busy {
            let _ = s.write_all(b"\r\n").await;
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), read_response(s, &mut Vec::new())).await {
                if r.status == 200 {
                    ok += 1;
                }
            }
        }
        ok
    });
    eprintln!("[fleet] over the limit: {answers:?}; {finished} of 8 clients mid-request answered 200");
    for (what, status, retry_after) in &answers {
        assert_eq!(*status, Some(503), "{what}: a connection over the limit");
        assert!(retry_after, "{what}: 503 without Retry-After");
    }
    assert_eq!(finished, 8, "clients mid-request must not be closed to make room");
}

fn has_retry_after(head: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
    })
}

// ------------------------------------------------------ idle connections

/// Resident memory each idle kept-alive connection costs regmirror, in
/// KiB: `n` HTTP/1.1 TLS connections from 40 addresses, one warm manifest
/// GET each, then all held open and quiet until the figure settles.
fn idle_kib_per_connection(n: usize) -> f64 {
    raise_nofile(20_000);
    let (rt, _fake, rm, path) = cached_manifest_stack("[limits]\nmax_connections = 10000\n");
    let https = rm.config.https;
    let settle = || std::thread::sleep(Duration::from_secs(3));
    settle();
    let (before, _) = rm.rss_kib();
    let ca: Arc<Path> = Arc::from(rm.ca_pem.as_path());
    let path: Arc<str> = Arc::from(path.as_str());
    let clients = rt.block_on(async {
        // A couple of hundred handshakes at a time, as a fleet's would
        // overlap. All 4,000 at once would queue some behind the others'
        // (unoptimised, in a debug build) handshakes past
        // `limits.handshake_timeout`, and the server rightly closes those.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(200));
        let mut tasks = Vec::new();
        for i in 0..n {
            let (ca, path) = (ca.clone(), path.clone());
            let permit = in_flight.clone().acquire_owned().await.expect("semaphore open");
            tasks.push(tokio::spawn(async move {
                let mut c = TlsClient::connect(src(4, (i % 40) as u8 + 1), https, &ca, b"http/1.1").await?;
                let r = c.get(&path).await?;
                drop(permit);
                Ok::<_, std::io::Error>((r.status, c))
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            let (status, c) = t.await.expect("client task").expect("connect and GET");
            assert_eq!(status, 200, "a warm manifest GET");
            clients.push(c);
        }
        clients
    });
    // Everything a request allocated has been given back, and the
    // allocator has returned what it will.
    std::thread::sleep(Duration::from_secs(10));
    let (after, _) = rm.rss_kib();
    let per = after.saturating_sub(before) as f64 / n as f64;
    eprintln!("[fleet] {n} idle HTTP/1.1 TLS connections: RSS {before} -> {after} KiB, {per:.1} KiB each");
    drop(clients);
    per
}

/// An idle HTTP/1.1 TLS connection holds no HTTP buffers: 4,000 of them
/// cost at most 16 KiB each (nginx, the same certificate: 16 KiB), so
/// `max_connections` can be tens of thousands on an ordinary machine.
#[test]
fn an_idle_http1_connection_holds_at_most_16_kib() {
    let per = idle_kib_per_connection(4000);
    assert!(per <= 16.0, "{per:.1} KiB per idle HTTP/1.1 TLS connection");
}

/// Between requests a kept-alive HTTP/1.1 connection gives hyper's buffers
/// back and waits on its own; the client must not notice. Over one TLS
/// connection that is never reopened: a request after an idle spell, two
/// pipelined in one write, one whose head arrives in two parts, and an
/// 8 MiB blob the client only starts reading after a second (its last
/// bytes wait in regmirror while the connection would otherwise be idle)
/// are all answered in full, in order.
#[test]
fn a_kept_alive_connection_is_served_across_idle_spells() {
    let (rt, fake, rm, manifest) = cached_manifest_stack("");
    let blob: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (digest, blob_path) = fake.add_blob("library/fleet", &blob);
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {SNI}\r\nAccept: {MANIFEST_TYPE}\r\n\r\n");
    rt.block_on(async {
        let mut c = TlsClient::connect(src(5, 1), rm.config.https, &rm.ca_pem, b"http/1.1")
            .await
            .expect("connect");
        let warm = c.get(&blob_path).await.expect("the blob, fetched from upstream");
        assert_eq!(common::sha256_digest(&warm.body), digest, "the blob as upstream has it");

        // Longer than the second after which hyper hands an idle socket back.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let after_idle = c.get(&manifest).await.expect("a request after an idle spell");
        assert_eq!(after_idle.status, 200, "after an idle spell");

        let two = format!("{}{}", request(&manifest), request(&blob_path));
        c.tls.write_all(two.as_bytes()).await.expect("two pipelined requests");
        let first = read_response(&mut c.tls, &mut c.buf)
            .await
            .expect("the first pipelined answer");
        let second = read_response(&mut c.tls, &mut c.buf)
            .await
            .expect("the second pipelined answer");
        assert_eq!(first.status, 200, "the first of two pipelined requests");
        assert_eq!(
            common::sha256_digest(&second.body),
            digest,
            "the second of two pipelined requests"
        );

        let split = request(&manifest);
        let (front, back) = split.split_at(10);
        c.tls.write_all(front.as_bytes()).await.expect("half a request head");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.tls.write_all(back.as_bytes()).await.expect("the rest of the head");
        let whole = read_response(&mut c.tls, &mut c.buf)
            .await
            .expect("a head sent in two parts");
        assert_eq!(whole.status, 200, "a head sent in two parts");

        c.tls
            .write_all(request(&blob_path).as_bytes())
            .await
            .expect("a blob request");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let slow = read_response(&mut c.tls, &mut c.buf)
            .await
            .expect("the blob, read late");
        assert_eq!(
            common::sha256_digest(&slow.body),
            digest,
            "the blob, read a second late"
        );

        let last = c.get(&manifest).await.expect("a request after the slow read");
        assert_eq!(last.status, 200, "after the slow read");
    });
    assert_eq!(fake.count("GET", &blob_path), 1, "the blob came from upstream once");
}
