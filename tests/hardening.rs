//! Hostile clients cannot take the mirror down (DESIGN.md "Security", issue
//! 13): thousands of sockets that send nothing, half a TLS ClientHello or
//! half a request head do not lock real pulls out, and are closed after
//! their timeout; HTTP/2 clients asking for many streams, or never reading
//! what they asked for, keep regmirror's peak memory inside its budget.
//!
//! regmirror runs as its own process (the harness in `common::regmirror`), so
//! its file descriptors and its peak RSS (`VmHWM`) are its own.

mod common;

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::images::{build_image, Format};
use common::matrix::assert_pulled;
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};
use common::wire::{fd_count, raise_nofile};
use common::{alloc_ip, clients::Sandbox, UpstreamEnv, UpstreamEnvOpts, UPSTREAM_HOST};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The goal for peak RSS under HTTP/2 pressure.
const RSS_LIMIT_KIB: u64 = 160 * 1024;

// ---------------------------------------------------------------- helpers

/// `VmHWM` (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

fn plain_client() -> reqwest::Client {
    common::init_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client")
}

/// regmirror in front of an in-process fake upstream holding one blob of
/// `size` bytes under `library/big`, the blob fetched once so it is cached.
/// Returns the runtime the fake runs on (keep it alive), the fake, regmirror,
/// and the blob's URL on the plain listener.
fn cached_blob_stack(
    size: usize,
    extra_toml: &str,
) -> (
    tokio::runtime::Runtime,
    fake_upstream::FakeUpstream,
    Regmirror,
    String,
    String,
) {
    common::init_crypto();
    let rt = common::runtime();
    let fake = rt.block_on(fake_upstream::FakeUpstream::start(&format!("{}:0", alloc_ip())));
    let data = fake_upstream::bytes_for("hardening big blob", size);
    let (digest, _) = fake.add_blob("library/big", &data);
    drop(data);
    let mut cfg =
        Config::new(alloc_ip()).with_upstream(UpstreamEntry::new("docker.io", DOCKER_HOSTS, &fake.url(), "dockerhub"));
    cfg.extra_toml = extra_toml.to_string();
    let rm = Regmirror::start(cfg);
    let url = format!("{}/v2/dockerhub/library/big/blobs/{digest}", rm.http_url());
    let got = rt.block_on(fetch_digest(&url));
    assert_eq!(got.as_deref(), Some(digest.as_str()), "warming the cache with {url}");
    (rt, fake, rm, url, digest)
}

/// GETs `url` and returns the sha256 of what arrived (None on any failure).
async fn fetch_digest(url: &str) -> Option<String> {
    use sha2::Digest as _;
    let mut resp = plain_client().get(url).send().await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let mut h = sha2::Sha256::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        h.update(&chunk);
    }
    Some(format!("sha256:{}", hex::encode(h.finalize())))
}

// ---------------------------------------------------------- idle sockets

/// What a hostile socket sends before going quiet.
#[derive(Clone, Copy, Debug)]
enum Opening {
    Nothing,
    /// The first bytes of a TLS ClientHello: a record header announcing 512
    /// bytes, then 40 of them.
    PartialClientHello,
    /// A request line and one header, never the blank line.
    PartialRequestHead,
}

impl Opening {
    fn bytes(self) -> Vec<u8> {
        match self {
            Opening::Nothing => Vec::new(),
            Opening::PartialClientHello => {
                let mut b = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
                b.extend_from_slice(&[0x5a; 32]);
                b
            }
            Opening::PartialRequestHead => b"GET /v2/ HTTP/1.1\r\nHost: regmirror.test\r\n".to_vec(),
        }
    }
}

#[derive(Default)]
struct FloodStats {
    connected: AtomicUsize,
    closed_by_server: AtomicUsize,
    connect_failed: AtomicUsize,
    longest_ms: AtomicUsize,
}

/// One hostile slot: connect from `src`, send `opening`, wait for the server
/// to close; again (after a pause) until `stop`, then wait for the last
/// socket's close. Returns false if that last socket was still open at
/// `give_up`.
async fn hostile_slot(
    src: IpAddr,
    dst: SocketAddr,
    opening: Opening,
    stop: Arc<AtomicBool>,
    stats: Arc<FloodStats>,
    give_up: Duration,
) -> bool {
    loop {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(src, 0)).expect("bind source address");
        let Ok(mut s) = sock.connect(dst).await else {
            stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if stop.load(Ordering::Relaxed) {
                return true;
            }
            continue;
        };
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        let _ = s.write_all(&opening.bytes()).await;
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(give_up, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // e.g. a 408 or a TLS alert before the close
                }
            }
        })
        .await
        .is_ok();
        if !closed {
            eprintln!(
                "[hardening] {opening:?} socket {:?} -> {dst} still open after {give_up:?}",
                s.local_addr().ok()
            );
            return false;
        }
        stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
        stats
            .longest_ms
            .fetch_max(opened.elapsed().as_millis() as usize, Ordering::Relaxed);
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        if stop.load(Ordering::Relaxed) {
            return true;
        }
    }
}

/// 5,000 hostile sockets (more than the default cap of 4,096 connections)
/// from 25 client addresses (fewer than the default 256 per address), silent
/// or stopping half-way through a ClientHello or a request head, on both
/// listeners, reconnecting a second after each close, kept up while skopeo
/// pulls an image through the TLS listener twice. The pulls succeed; every
/// hostile socket is closed within its timeout; regmirror never holds more
/// descriptors than its cap allows, and they come back afterwards.
#[test]
fn idle_sockets_do_not_lock_out_real_pulls() {
    const SLOTS: u32 = 5000;
    raise_nofile(20_000);
    let env = UpstreamEnv::start(UpstreamEnvOpts::default());
    let img = build_image(Format::Oci, "amd64", &[300 * 1024, 40 * 1024]);
    env.pusher.push_image("library/hard-idle", "1", &img);
    let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
    cfg.extra_toml =
        "[limits]\nhandshake_timeout = \"3s\"\nfirst_request_timeout = \"3s\"\nidle_timeout = \"5s\"\n".to_string();
    let rm = Regmirror::start(cfg);
    let pid = rm.pid();
    let baseline = fd_count(pid);

    let rt = common::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(FloodStats::default());
    // A socket must be closed within its timeout (3 s), plus slack for a
    // loaded machine and for the kernel: a connection completed while the
    // accept queue was full reaches regmirror only when the kernel retries
    // its SYN-ACK (up to ~31 s with tcp_synack_retries = 5).
    let give_up = Duration::from_secs(40);
    let mut slots = Vec::new();
    for i in 0..SLOTS {
        let src = IpAddr::V4(Ipv4Addr::new(127, 251, 0, (i % 25) as u8 + 1));
        let (dst, opening) = match i % 20 {
            0..=9 => (rm.config.https, Opening::Nothing),
            10..=12 => (rm.config.https, Opening::PartialClientHello),
            13..=16 => (rm.config.http, Opening::Nothing),
            _ => (rm.config.http, Opening::PartialRequestHead),
        };
        // A one-second ramp, not one burst, as a script opening sockets would.
        let ramp = Duration::from_micros(200 * u64::from(i));
        let slot = hostile_slot(src, dst, opening, stop.clone(), stats.clone(), give_up);
        slots.push(rt.spawn(async move {
            tokio::time::sleep(ramp).await;
            slot.await
        }));
    }
    // Pull only once regmirror is full of them.
    let full = common::wait_until(Duration::from_secs(30), || fd_count(pid) >= 4000);
    let during = fd_count(pid);
    assert!(full, "the flood never filled regmirror: {during} descriptors");

    let started = Instant::now();
    let sb = Sandbox::new(rm.ip(), &rm.config.client_hostnames(), &rm.ca_pem);
    assert_pulled(
        "cold pull beside the flood",
        &sb.skopeo_copy("docker.io/library/hard-idle:1", None),
        &img.manifest_digest,
    );
    let other = Sandbox::new(rm.ip(), &rm.config.client_hostnames(), &rm.ca_pem);
    assert_pulled(
        "warm pull beside the flood",
        &other.skopeo_copy("docker.io/library/hard-idle:1", None),
        &img.manifest_digest,
    );
    let pulls = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    let all_closed = rt.block_on(async {
        let mut ok = 0;
        for s in slots {
            if s.await.unwrap_or(false) {
                ok += 1;
            }
        }
        ok
    });
    let fds_back = common::wait_until(Duration::from_secs(20), || fd_count(pid) <= baseline + 4);
    eprintln!(
        "[hardening] fds: baseline {baseline}, during flood {during}, after {}; hostile connects {}, closed by regmirror {}, \
         connect failures {}, longest-lived hostile socket {} ms; two skopeo pulls took {:?}",
        fd_count(pid),
        stats.connected.load(Ordering::Relaxed),
        stats.closed_by_server.load(Ordering::Relaxed),
        stats.connect_failed.load(Ordering::Relaxed),
        stats.longest_ms.load(Ordering::Relaxed),
        pulls,
    );
    assert_eq!(
        all_closed, SLOTS as usize,
        "hostile sockets regmirror did not close within {give_up:?}"
    );
    // The cap counts connections; a few hundred more descriptors may be
    // sockets closed to make room whose tasks have not run yet.
    assert!(
        during <= 4096 + 256,
        "regmirror held {during} descriptors during the flood (cap 4096 connections)"
    );
    assert!(
        fds_back,
        "regmirror's descriptors did not come back: {baseline} before, {} after",
        fd_count(pid)
    );
}

// ---------------------------------------------------------------- HTTP/2

/// `h2load -c 8 -m 256` (h2c on the plain listener) on a cached 64 MiB
/// blob: regmirror's peak RSS stays under 160 MiB, and it still serves.
#[test]
fn h2load_many_streams_stay_inside_the_memory_budget() {
    let (rt, _fake, rm, url, digest) = cached_blob_stack(64 << 20, "");
    let pid = rm.pid();
    let before = peak_rss_kib(pid);
    let out = std::process::Command::new("timeout")
        .args(["12", "h2load", "-c", "8", "-m", "256", "-n", "2048", &url])
        .output()
        .expect("run h2load (nghttp2-client)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 124: timeout stopped it; the point is the pressure, not completion.
    assert!(
        out.status.success() || out.status.code() == Some(124),
        "h2load failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let peak = peak_rss_kib(pid);
    eprintln!("[hardening] h2load: VmHWM {before} KiB before, {peak} KiB after\n{stdout}");
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {peak} KiB under h2load -c 8 -m 256 (limit {RSS_LIMIT_KIB} KiB)"
    );
    assert_eq!(
        rt.block_on(fetch_digest(&url)).as_deref(),
        Some(digest.as_str()),
        "a GET after h2load"
    );
}

/// The HTTP/2 frames of a client that opens `streams` GETs of `path` with the
/// largest flow-control windows HTTP/2 allows, so the server may send as
/// fast as it likes, and then never reads a byte.
fn greedy_h2_preamble(authority: &str, path: &str, streams: u32) -> Vec<u8> {
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    fn literal(out: &mut Vec<u8>, name_index: u8, value: &str) {
        assert!(value.len() < 127, "header value too long for this encoder");
        out.push(name_index); // literal without indexing, indexed name
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut settings = Vec::new();
    settings.extend_from_slice(&[0x00, 0x02, 0, 0, 0, 0]); // ENABLE_PUSH 0
    settings.extend_from_slice(&[0x00, 0x04, 0x7f, 0xff, 0xff, 0xff]); // INITIAL_WINDOW_SIZE max
    frame(&mut out, 0x4, 0, 0, &settings);
    frame(&mut out, 0x8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()); // WINDOW_UPDATE
    for i in 0..streams {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        literal(&mut block, 0x01, authority);
        literal(&mut block, 0x04, path);
        frame(&mut out, 0x1, 0x5, 2 * i + 1, &block); // HEADERS, END_STREAM | END_HEADERS
    }
    out
}

/// 16 HTTP/2 connections, each opening 64 streams on a cached 64 MiB blob
/// with unlimited windows and never reading: peak RSS stays under 160 MiB,
/// a normal client still gets the whole blob, and regmirror lets the
/// readers-that-never-read go after `idle_timeout`.
#[test]
fn h2_clients_that_never_read_stay_inside_the_memory_budget() {
    raise_nofile(20_000);
    let (rt, _fake, rm, url, digest) = cached_blob_stack(64 << 20, "[limits]\nidle_timeout = \"4s\"\n");
    let pid = rm.pid();
    let baseline = fd_count(pid);
    let before = peak_rss_kib(pid);
    let addr = rm.config.http;
    let path = url.strip_prefix(&rm.http_url()).expect("path").to_string();
    let greedy = rt.block_on(async {
        let mut socks = Vec::new();
        for _ in 0..16 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(&greedy_h2_preamble(&addr.to_string(), &path, 64))
                .await
                .expect("send h2 preamble");
            socks.push(s);
        }
        socks
    });
    std::thread::sleep(Duration::from_secs(2));
    let held = peak_rss_kib(pid);
    // A well-behaved client is served in full while (and after) they hold on.
    let normal = rt.block_on(fetch_digest(&url));
    let released = common::wait_until(Duration::from_secs(30), || fd_count(pid) <= baseline + 2);
    let peak = peak_rss_kib(pid);
    eprintln!(
        "[hardening] never-reading h2 clients: VmHWM {before} KiB before, {held} KiB while held, {peak} KiB at the end; \
         fds {baseline} before, {} after",
        fd_count(pid)
    );
    drop(greedy);
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {peak} KiB with 16 never-reading h2 clients (limit {RSS_LIMIT_KIB} KiB)"
    );
    assert_eq!(normal.as_deref(), Some(digest.as_str()), "a normal GET beside them");
    assert!(released, "regmirror kept the never-reading connections open");
}
