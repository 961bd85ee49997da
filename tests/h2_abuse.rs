//! HTTP/2 clients that abuse the protocol (issue 27). Each kind is sent
//! from 4 connections, again and again for a few seconds, while a real
//! client GETs a warm manifest over TLS h2 every 50 ms: every real GET
//! succeeds and stays fast, regmirror's memory stays flat, every abuser's
//! connection is closed by regmirror, and each one is counted under its
//! kind in `regmirror_h2_abuse_total` and logged.
//!
//! Frames are written by hand (no client library would send them), over
//! TLS with ALPN h2 as a client of the TLS listener would. Client source
//! addresses are 127.253.x.y, which no other test uses.

mod common;

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::alloc_ip;
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};
use common::wire::{client_config, tcp_from};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const GOAWAY: u8 = 0x7;
const PING: u8 = 0x6;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const SNI: &str = "registry-1.docker.io";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A GET of `path` as an HPACK block: indexed `:method GET` and `:scheme
/// http`, literal `:authority` and `:path` without indexing.
fn get_block(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86];
    for (index, value) in [(0x01u8, authority), (0x04, path)] {
        assert!(value.len() < 127, "header value too long for this encoder");
        block.push(index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The preface, empty SETTINGS, then `streams` GETs each reset (CANCEL)
/// straight after its HEADERS.
fn rapid_reset(authority: &str, path: &str, streams: u32) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let block = get_block(authority, path);
    for i in 0..streams {
        let id = 2 * i + 1;
        frame(&mut out, 0x1, 0x5, id, &block); // HEADERS, END_STREAM | END_HEADERS
        frame(&mut out, 0x3, 0, id, &0x8u32.to_be_bytes()); // RST_STREAM CANCEL
    }
    out
}

/// Reads frames until the server closes (or `within` passes), answering
/// its PINGs as a live client does (so its keep-alive never closes us);
/// returns the error code of the last GOAWAY seen and whether it closed.
async fn goaway_and_close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, within: Duration) -> (Option<u32>, bool) {
    let mut buf = Vec::new();
    let mut goaway = None;
    let closed = tokio::time::timeout(within, async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let p = buf[9..9 + len].to_vec();
                if buf[3] == GOAWAY && len >= 8 {
                    goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                }
                if buf[3] == PING && buf[4] & 0x1 == 0 {
                    let mut ack = Vec::new();
                    frame(&mut ack, PING, 0x1, 0, &p);
                    let _ = s.write_all(&ack).await;
                }
                buf.drain(..9 + len);
            }
        }
    })
    .await
    .is_ok();
    (goaway, closed)
}

/// A HEADERS frame without END_HEADERS, then `frames` CONTINUATION frames
/// of 16 KiB that never end the header block (the 2024 "CONTINUATION
/// flood"): a server that buffers them until END_HEADERS holds it all.
fn continuation_flood(authority: &str, path: &str, frames: u32) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    frame(&mut out, 0x1, 0x1, 1, &get_block(authority, path)); // HEADERS, END_STREAM only
                                                               // Literal header fields without indexing, new names: x-N: 16 KiB / field.
    let mut field = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f];
    let value_len = 16 * 1024 - 16;
    let mut n = value_len - 127;
    while n >= 128 {
        field.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    field.push(n as u8);
    field.resize(field.len() + value_len, b'v');
    for _ in 0..frames {
        frame(&mut out, 0x9, 0, 1, &field); // CONTINUATION without END_HEADERS
    }
    out
}

/// A HEADERS block of one literal header of 4,000 bytes added to the
/// dynamic table, then that entry referenced 300 times: 4 KiB on the wire,
/// 1.2 MB decoded, over four times `max_header_list_size` (an HPACK bomb).
fn header_list_bomb(authority: &str, path: &str) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let mut block = get_block(authority, path);
    // Literal with incremental indexing, new name "x-b", value 4,000 bytes.
    block.extend([0x40, 0x03, b'x', b'-', b'b', 0x7f]);
    let mut n = 4000 - 127;
    while n >= 128 {
        block.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    block.push(n as u8);
    block.resize(block.len() + 4000, b'v');
    // Indexed: the newest dynamic entry is index 62.
    block.extend(std::iter::repeat_n(0x80 | 62, 300));
    frame(&mut out, 0x1, 0x5, 1, &block);
    out
}

/// `n` PINGs (CVE-2019-9512): each one asks the server for an answer.
fn ping_flood(n: usize) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    for i in 0..n {
        frame(&mut out, PING, 0, 0, &(i as u64).to_be_bytes());
    }
    out
}

/// `n` SETTINGS frames (CVE-2019-9515): each one must be applied and
/// acknowledged.
fn settings_flood(n: usize) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    for _ in 0..n {
        frame(&mut out, 0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]); // INITIAL_WINDOW_SIZE 65535
    }
    out
}

/// A window of 0 (SETTINGS_INITIAL_WINDOW_SIZE), then 50 GETs of `path`
/// and never a WINDOW_UPDATE (CVE-2019-9517): every response waits in
/// the server for a client that will not take it.
fn zero_window(authority: &str, path: &str) -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, 0x4, 0, 0, &[0, 4, 0, 0, 0, 0]);
    let mut block = get_block(authority, path);
    block.extend([0x40, 0x06]);
    block.extend_from_slice(b"accept");
    block.push(MANIFEST_TYPE.len() as u8);
    block.extend_from_slice(MANIFEST_TYPE.as_bytes());
    for i in 0..50u32 {
        frame(&mut out, 0x1, 0x5, 2 * i + 1, &block);
    }
    out
}

/// regmirror in front of a fake upstream holding one manifest, fetched
/// once so it is cached; `limits` is appended as `[limits]`.
struct Stack {
    rt: tokio::runtime::Runtime,
    _fake: fake_upstream::FakeUpstream,
    rm: Regmirror,
    path: String,
}

impl Stack {
    fn start(limits: &str) -> Stack {
        common::init_crypto();
        let rt = common::runtime();
        let fake = rt.block_on(fake_upstream::FakeUpstream::start(&format!("{}:0", alloc_ip())));
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let digest = fake.add_manifest("library/abuse", Some("1"), MANIFEST_TYPE, body);
        let mut cfg = Config::new(alloc_ip()).with_upstream(UpstreamEntry::new(
            "docker.io",
            DOCKER_HOSTS,
            &fake.url(),
            "dockerhub",
        ));
        if !limits.is_empty() {
            cfg.extra_toml = format!("[limits]\n{limits}\n");
        }
        let rm = Regmirror::start(cfg);
        let path = format!("/v2/library/abuse/manifests/{digest}");
        let s = Stack {
            rt,
            _fake: fake,
            rm,
            path,
        };
        let warm =
            s.rt.block_on(async { real_client(src(250), &s.rm).get(s.url()).send().await });
        assert_eq!(warm.map(|r| r.status().as_u16()).ok(), Some(200), "warming {}", s.path);
        s
    }

    fn url(&self) -> String {
        format!("https://{SNI}{}", self.path)
    }
}

/// A real HTTP/2 client (reqwest, TLS with ALPN h2) of the TLS listener.
fn real_client(from: IpAddr, rm: &Regmirror) -> reqwest::Client {
    let pem = std::fs::read(&rm.ca_pem).expect("read CA");
    reqwest::Client::builder()
        .no_proxy()
        .local_address(from)
        .resolve(SNI, rm.config.https)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA"))
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// One abusive connection: TLS with ALPN h2 from `from`, `bytes`, then
/// reading (and answering PINGs) until regmirror closes it.
async fn abuse(from: IpAddr, to: SocketAddr, ca: &Path, bytes: &[u8]) -> (Option<u32>, bool) {
    let tcp = tcp_from(from, to).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, b"h2"));
    let name = ServerName::try_from(SNI.to_string()).expect("server name");
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return (None, true);
    };
    // A failed write is the server having cut us off already.
    let _ = tls.write_all(bytes).await;
    let _ = tls.flush().await;
    goaway_and_close(&mut tls, Duration::from_secs(20)).await
}

/// The real client's GETs: each latency, or what went wrong.
async fn real_gets(
    client: &reqwest::Client,
    url: &str,
    every: Duration,
    until: Instant,
) -> Vec<Result<Duration, String>> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let r = client.get(url).header("accept", MANIFEST_TYPE).send().await;
        out.push(match r {
            Ok(r) if r.status() == 200 => match r.bytes().await {
                Ok(_) => Ok(started.elapsed()),
                Err(e) => Err(format!("body: {e}")),
            },
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(format!("{e:?}")),
        });
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
    out
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn abuse_count(metrics: &str, kind: &str) -> f64 {
    let prefix = format!("regmirror_h2_abuse_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0.0)
}

/// The harness of every abuse test: `make(authority, path)` is what each
/// abusive connection sends; 4 connections send it again and again for
/// three seconds while the real client GETs every 50 ms. Returns the
/// GOAWAY codes the abusers saw.
fn abused_beside_a_real_client(kind: &str, limits: &str, make: impl Fn(&str, &str) -> Vec<u8>) -> Vec<Option<u32>> {
    const ABUSERS: u8 = 4;
    const FOR: Duration = Duration::from_secs(3);
    // One kind at a time: six floods at once on two cores would measure
    // each other, not regmirror's treatment of the one under test.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let s = Stack::start(limits);
    // reqwest's client needs the runtime it will run on while built.
    let client = s.rt.block_on(async { real_client(src(1), &s.rm) });
    let url = s.url();
    let idle: Vec<Duration> =
        s.rt.block_on(real_gets(
            &client,
            &url,
            Duration::from_millis(50),
            Instant::now() + Duration::from_secs(1),
        ))
        .into_iter()
        .map(|r| r.expect("a GET before any abuse"))
        .collect();
    let (rss_before, _) = s.rm.rss_kib();

    let bytes = Arc::new(make(SNI, &s.path));
    let https = s.rm.config.https;
    let ca: Arc<Path> = Arc::from(s.rm.ca_pem.as_path());
    let until = Instant::now() + FOR;
    let abusers: Vec<_> = (0..ABUSERS)
        .map(|i| {
            let (bytes, ca) = (bytes.clone(), ca.clone());
            s.rt.spawn(async move {
                let mut seen = Vec::new();
                while Instant::now() < until {
                    seen.push(abuse(src(10 + i), https, &ca, &bytes).await);
                }
                seen
            })
        })
        .collect();
    let during =
        s.rt.block_on(real_gets(&client, &url, Duration::from_millis(50), until));
    let cuts: Vec<(Option<u32>, bool)> = s.rt.block_on(async {
        let mut all = Vec::new();
        for a in abusers {
            all.extend(a.await.expect("abuser task"));
        }
        all
    });
    let (rss_after, _) = s.rm.rss_kib();

    let failed: Vec<&String> = during.iter().filter_map(|r| r.as_ref().err()).collect();
    let ok: Vec<Duration> = during.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    let (idle_p99, abused_p99) = (p99(idle), p99(ok.clone()));
    // regmirror counts a connection as it finishes closing it, a moment
    // after the abuser sees the close.
    let mut metrics = String::new();
    let _all_counted = common::wait_until(Duration::from_secs(5), || {
        metrics = s.rm.metrics();
        abuse_count(&metrics, kind) >= cuts.len() as f64
    });
    let counted = abuse_count(&metrics, kind);
    eprintln!(
        "[h2_abuse] {kind}: {} abusive connections, {} closed by regmirror, {counted} counted; real GETs: {} ok, \
         {} failed {:?}; p99 {idle_p99:?} idle, {abused_p99:?} under abuse; RSS {rss_before} -> {rss_after} KiB",
        cuts.len(),
        cuts.iter().filter(|c| c.1).count(),
        ok.len(),
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        failed.is_empty(),
        "{kind}: real GETs failed beside the abuse: {failed:?}"
    );
    assert!(ok.len() >= 40, "{kind}: only {} real GETs in {FOR:?}", ok.len());
    // 10× the idle p99, and no less than 50 ms: loopback GETs of a debug
    // build take about a millisecond, which a scheduler tick can double.
    let bound = (idle_p99 * 10).max(Duration::from_millis(50));
    assert!(
        abused_p99 < bound,
        "{kind}: real GETs' p99 {abused_p99:?} under abuse, {idle_p99:?} idle"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "{kind}: RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(cuts.len() >= ABUSERS as usize, "{kind}: {cuts:?}");
    assert!(
        cuts.iter().all(|(_, closed)| *closed),
        "{kind}: regmirror left abusive connections open: {cuts:?}"
    );
    assert!(
        counted >= cuts.len() as f64,
        "{kind}: {counted} counted for {} abusive connections:\n{metrics}",
        cuts.len()
    );
    let log = s.rm.log();
    let line = format!("closing HTTP/2 connection: {}", kind.replace('_', " "));
    assert!(log.contains(&line), "{kind}: no log line {line:?}");
    cuts.into_iter().map(|c| c.0).collect()
}

fn src(d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 253, 0, d))
}

/// CVE-2023-44487, rapid reset: 1,000 streams opened and reset at once on
/// each connection get GOAWAY(ENHANCE_YOUR_CALM).
#[test]
fn rapid_reset_is_cut_off_with_goaway() {
    let goaways = abused_beside_a_real_client("rapid_reset", "", |a, p| rapid_reset(a, p, 1000));
    assert!(goaways.iter().all(|g| *g == Some(ENHANCE_YOUR_CALM)), "{goaways:?}");
}

/// CVE-2024-27316, CONTINUATION flood: a header block continued for 4 MiB
/// without an end.
#[test]
fn a_header_block_that_never_ends_is_cut_off() {
    let goaways = abused_beside_a_real_client("continuation_flood", "", |a, p| continuation_flood(a, p, 256));
    assert!(goaways.iter().all(|g| *g == Some(ENHANCE_YOUR_CALM)), "{goaways:?}");
}

/// CVE-2016-6581 (HPACK bomb): a 4 KiB header block that decodes to 1.2 MB.
#[test]
fn a_header_list_far_over_the_limit_is_cut_off() {
    let goaways = abused_beside_a_real_client("header_list_too_large", "", header_list_bomb);
    assert!(goaways.iter().all(|g| *g == Some(ENHANCE_YOUR_CALM)), "{goaways:?}");
}

/// CVE-2019-9512, PING flood: 10,000 PINGs per connection.
#[test]
fn a_ping_flood_is_cut_off() {
    abused_beside_a_real_client("ping_flood", "", |_, _| ping_flood(10_000));
}

/// CVE-2019-9515, SETTINGS flood: 10,000 SETTINGS frames per connection.
#[test]
fn a_settings_flood_is_cut_off() {
    abused_beside_a_real_client("settings_flood", "", |_, _| settings_flood(10_000));
}

/// CVE-2019-9517, a flow-control window that never opens: 50 GETs whose
/// responses can never be sent are closed at `limits.idle_timeout` (here
/// 1 s), the client's PINGs answered all along.
#[test]
fn a_window_that_never_opens_is_cut_off() {
    abused_beside_a_real_client("zero_window", "idle_timeout = \"1s\"", zero_window);
}
