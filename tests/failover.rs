//! Upstreams with several URLs: failover, per-URL health and back-off,
//! retries, Retry-After, fail-fast answers and resumed downloads, with
//! regmirror in-process in front of in-process fake upstreams.
//!
//! Each test runs its own regmirror on `127.0.11.<n>:5000` (distinct `n`
//! per test) with its own cache directory, and its fakes on
//! `127.0.11.<100+n>:0`, `127.0.11.<150+n>:0` (and `.<200+n>`).

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;
mod in_process;

use std::time::{Duration, Instant};

use fake_upstream::{bytes_for, digest_of, FakeUpstream, Fault};
use in_process::{client, header};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct Mirror {
    /// First, so it stops before the store directory goes; held, never read.
    _served: in_process::Served,
    base: String,
    dir: tempfile::TempDir,
}

impl Mirror {
    /// Starts regmirror on `127.0.11.<n>:5000` with one upstream (docker.io,
    /// namespace `dockerhub`) whose table gets `upstream_keys` (TOML lines,
    /// which must set `url` or `urls`).
    async fn start(n: u8, upstream_keys: &str) -> Mirror {
        let ip = format!("127.0.11.{n}");
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        let toml = format!(
            r#"
[server]
http = "{ip}:5000"
name = "regmirror.test"
[ca]
dir = '{root}/certs'
[cache]
dir = '{root}/data'
max_size = "2GiB"
[[upstream]]
name = "docker.io"
hosts = ["registry-1.docker.io", "docker.io"]
namespace = "dockerhub"
{upstream_keys}
"#
        );
        let served = in_process::Served::start(&ip, &toml, "failover test").await;
        Mirror {
            base: served.base.clone(),
            dir,
            _served: served,
        }
    }

    /// URL of `/v2/dockerhub/library/<repo>/<rest>` (explicit prefix mode).
    fn url(&self, repo: &str, rest: &str) -> String {
        format!("{}/v2/dockerhub/library/{repo}/{rest}", self.base)
    }

    fn stored(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("data/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists()
    }
}

async fn get_text(c: &reqwest::Client, url: &str) -> String {
    let r = c.get(url).send().await.expect("request");
    assert_eq!(r.status(), 200, "{url}");
    r.text().await.expect("body")
}

async fn get_body(c: &reqwest::Client, url: &str) -> (u16, Vec<u8>) {
    let r = c.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    let body = r
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {url} body: {e}"))
        .to_vec();
    (status, body)
}

fn manifest_bytes(seed: &str) -> Vec<u8> {
    let config = digest_of(seed.as_bytes());
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{}}},"layers":[]}}"#,
        seed.len()
    )
    .into_bytes()
}

/// A fake holding the same blobs as `others`' first: a mirror of it.
fn blob_on_all(fakes: &[&FakeUpstream], data: &[u8]) -> (String, String) {
    let mut out = None;
    for f in fakes {
        out = Some(f.add_blob("library/app", data));
    }
    out.expect("at least one fake")
}

/// The first URL down (nothing listening): pulls go to the second, and the
/// first is tried once per back-off period, not on every request; once it is
/// back, it is used again after its back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_url_is_skipped_for_its_back_off_then_used_again() {
    let first = FakeUpstream::start("127.0.11.101:0").await;
    let first_addr = first.addr;
    let first_url = first.url();
    let second = FakeUpstream::start("127.0.11.151:0").await;
    let m = Mirror::start(1, &format!("urls = [\"{}\", \"{}\"]", first.url(), second.url())).await;
    let c = client();
    // Content only the second has, so every answer below says which URL served it.
    first.stop().await;

    for i in 0..5 {
        let data = bytes_for(&format!("down-{i}"), 10_000 + i);
        let (d, path) = second.add_blob("library/app", &data);
        let (status, body) = get_body(&c, &m.url("app", &format!("blobs/{d}"))).await;
        assert_eq!(status, 200, "pull {i} failed while the second URL was up");
        assert_eq!(body, data);
        assert_eq!(second.count("GET", &path), 1);
    }
    // The operator sees which URL is skipped, in /metrics and on the page.
    // URLs are shown normalised, as the url crate writes them.
    let url_up = |url: String| format!("regmirror_upstream_url_up{{upstream=\"docker.io\",url=\"{url}/\"}} ");
    let metrics = get_text(&c, &format!("{}/metrics", m.base)).await;
    assert!(
        metrics.contains(&format!("{}0", url_up(first_url.clone()))),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("{}1", url_up(second.url()))), "{metrics}");
    let page = get_text(&c, &format!("{}/", m.base)).await;
    let row = |url: String| {
        let at = page.find(&format!("<code>{url}/</code>")).expect("a row for each URL");
        page[at..].split("</tr>").next().unwrap_or("").to_string()
    };
    assert!(row(first_url.clone()).contains("backing off"), "{page}");
    assert!(row(first_url.clone()).contains("connect"), "the page says why: {page}");
    assert!(row(second.url()).contains("in use"), "{page}");

    // Bring the first URL back on the same address, with its own content.
    let first = FakeUpstream::start(&first_addr.to_string()).await;
    let data = bytes_for("back", 20_000);
    let (d, first_path) = blob_on_all(&[&first, &second], &data);
    // During its back-off the first URL is still skipped.
    let (status, _) = get_body(&c, &m.url("app", &format!("blobs/{d}"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        first.count("GET", &first_path),
        0,
        "the first URL was asked during its back-off"
    );

    // After its back-off (2 s after its one failure) it is probed and used.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let data = bytes_for("back-2", 20_001);
    let (d, path) = blob_on_all(&[&first, &second], &data);
    let (status, body) = get_body(&c, &m.url("app", &format!("blobs/{d}"))).await;
    assert_eq!((status, body == data), (200, true));
    assert_eq!(first.count("GET", &path), 1, "the first URL is used again once back");
    assert_eq!(second.count("GET", &path), 0);
    let metrics = get_text(&c, &format!("{}/metrics", m.base)).await;
    assert!(metrics.contains(&format!("{}1", url_up(first.url()))), "{metrics}");
}

/// A URL answering 503 sends requests to the next at once; the first is
/// then skipped while the second serves, instead of costing a 503 per pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_answering_5xx_fails_over_and_is_then_skipped() {
    let first = FakeUpstream::start("127.0.11.102:0").await;
    let second = FakeUpstream::start("127.0.11.152:0").await;
    let m = Mirror::start(2, &format!("urls = [\"{}\", \"{}\"]", first.url(), second.url())).await;
    let c = client();
    let mut first_asked = 0;
    for i in 0..4 {
        let data = bytes_for(&format!("5xx-{i}"), 5_000 + i);
        let (d, path) = blob_on_all(&[&first, &second], &data);
        first.set_fault(&path, Fault::Status(503));
        let t = Instant::now();
        let (status, body) = get_body(&c, &m.url("app", &format!("blobs/{d}"))).await;
        assert_eq!((status, body == data), (200, true), "pull {i}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "failing over took {:?}: it waited for a retry delay instead of going to the next URL",
            t.elapsed()
        );
        first_asked += first.count("GET", &path);
    }
    assert_eq!(first_asked, 1, "the failing URL was asked on every pull");
}

/// Every URL down and nothing cached: 503 with Retry-After at once (well
/// under the connect timeout), so runtimes can fall back to their next mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_down_is_answered_503_with_retry_after_at_once() {
    let a = FakeUpstream::start("127.0.11.103:0").await;
    let b = FakeUpstream::start("127.0.11.153:0").await;
    let m = Mirror::start(
        3,
        &format!(
            "urls = [\"{}\", \"{}\"]\nretries = 1\nretry_delay = \"100ms\"",
            a.url(),
            b.url()
        ),
    )
    .await;
    let c = client();
    a.stop().await;
    b.stop().await;
    let d = digest_of(b"nowhere");
    // The first request finds out (connection refused on both, one retry).
    let r = c.get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    for what in ["blobs", "manifests"] {
        let t = Instant::now();
        let r = c.get(m.url("app", &format!("{what}/{d}"))).send().await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status(), 503, "{what}");
        let ra: u64 = header(&r, "retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no Retry-After"));
        assert!((1..=60).contains(&ra), "Retry-After {ra}");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
        let message = body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("127.0.11.1") && message.contains("unreachable"),
            "the answer does not say which URL failed and how: {message}"
        );
        assert!(
            took < Duration::from_secs(2),
            "{what}: a known-down upstream took {took:?} to answer"
        );
    }
}

/// 429 with `Retry-After: 60` on a tag seen before: the stored answer at
/// once, not after a minute; and upstream is not asked again sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_rate_limited_for_a_minute_is_served_stale_at_once() {
    let up = FakeUpstream::start("127.0.11.104:0").await;
    let m = Mirror::start(4, &format!("url = \"{}\"", up.url())).await;
    let c = client();
    let manifest = manifest_bytes("limited");
    let d = up.add_manifest("library/app", Some("v1"), OCI_MANIFEST, &manifest);
    let tag_path = "/v2/library/app/manifests/v1";
    let url = m.url("app", "manifests/v1");
    let r = c.get(&url).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), manifest);

    up.set_fault(tag_path, Fault::TooMany { retry_after: 60 });
    let t = Instant::now();
    let r = c.get(&url).header("accept", OCI_MANIFEST).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 200, "the stale record was not served");
    assert!(header(&r, "warning").is_some_and(|w| w.starts_with("110 ")));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(r.bytes().await.unwrap(), manifest);
    assert!(took < Duration::from_secs(2), "waited {took:?} on a Retry-After: 60");
    assert_eq!(
        up.count("HEAD", tag_path),
        2,
        "the 429 was retried before its Retry-After"
    );
}

/// Retries: a URL that fails twice and then answers serves the request,
/// after waiting `retry_delay` (not at once, and not forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_retried_after_the_retry_delay() {
    let up = FakeUpstream::start("127.0.11.105:0").await;
    let m = Mirror::start(
        5,
        &format!("url = \"{}\"\nretries = 2\nretry_delay = \"300ms\"", up.url()),
    )
    .await;
    let c = client();
    let data = bytes_for("retried", 4_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.set_fault(&path, Fault::Status(502));
    let url = m.url("app", &format!("blobs/{d}"));
    let t = Instant::now();
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 502, "three 502s in a row reach the client");
    assert_eq!(up.count("GET", &path), 3, "one try and two retries");
    // 300 ms then 600 ms, each jittered down to no less than half.
    assert!(t.elapsed() >= Duration::from_millis(450), "{:?}", t.elapsed());

    // A 404 is an answer: not retried.
    let missing = digest_of(b"not there");
    let r = c.get(m.url("app", &format!("blobs/{missing}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(up.count("GET", &format!("/v2/library/app/blobs/{missing}")), 1);

    up.clear_fault(&path);
    let (status, body) = get_body(&c, &url).await;
    assert_eq!((status, body == data), (200, true));
    assert!(m.stored(&d));
}

/// Fast filler for big blobs (a debug-build sha256 chain would take longer
/// than the download): xorshift bytes, distinct per seed.
fn big_blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads a GET to the end: (status, body), or the error that broke it.
async fn stream_all(c: reqwest::Client, url: String) -> Result<(u16, Vec<u8>), String> {
    let mut r = c.get(&url).send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| format!("after {} bytes: {e}", body.len()))?
    {
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// A 200 MiB layer whose download upstream cuts at four points is finished
/// by resuming with `Range: bytes=N-`: three clients streaming it get every
/// byte, unbroken, upstream sends it about once, and it is stored verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_at_several_points_is_resumed_without_a_break() {
    let up = FakeUpstream::start("127.0.11.106:0").await;
    let m = Mirror::start(6, &format!("url = \"{}\"", up.url())).await;
    let size: usize = 200 << 20;
    let data = big_blob(6, size);
    let (d, path) = up.add_blob("library/app", &data);
    let cuts: Vec<u64> = [0.1, 0.35, 0.6, 0.9].iter().map(|f| (size as f64 * f) as u64).collect();
    up.cut_at(&path, &cuts);

    let url = m.url("app", &format!("blobs/{d}"));
    let clients: Vec<_> = (0..3)
        .map(|_| tokio::spawn(stream_all(client(), url.clone())))
        .collect();
    for (i, t) in clients.into_iter().enumerate() {
        let (status, body) = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i}: the transfer broke: {e}"));
        assert_eq!(status, 200, "client {i}");
        assert!(
            body == data,
            "client {i}: {} bytes that differ from the blob",
            body.len()
        );
    }
    let ranges = up.ranges(&path);
    assert_eq!(ranges.len(), 5, "one GET and four resumes: {ranges:?}");
    assert_eq!(ranges[0], None);
    for r in &ranges[1..] {
        let from: u64 = r
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a resume without a usable Range: {ranges:?}"));
        assert!(from > 0 && from < size as u64, "{ranges:?}");
    }
    let sent = up.body_bytes(&path) as f64;
    assert!(
        sent <= size as f64 * 1.01,
        "upstream sent {:.2}× the blob",
        sent / size as f64
    );
    assert!(m.stored(&d), "the resumed download was not stored");
}

/// An upstream that ignores the Range of a resume and sends the whole body
/// again (200): the bytes already written are skipped, the result is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_answered_with_the_whole_body_skips_what_was_written() {
    let up = FakeUpstream::start("127.0.11.107:0").await;
    let m = Mirror::start(7, &format!("url = \"{}\"", up.url())).await;
    let size: usize = 8 << 20;
    let data = big_blob(7, size);
    let (d, path) = up.add_blob("library/app", &data);
    up.ignore_range(true);
    up.cut_at(&path, &[(size / 3) as u64, (size / 2) as u64]);
    let (status, body) = stream_all(client(), m.url("app", &format!("blobs/{d}")))
        .await
        .unwrap_or_else(|e| panic!("the transfer broke: {e}"));
    assert_eq!(status, 200);
    assert!(body == data, "{} bytes that differ from the blob", body.len());
    assert_eq!(up.count("GET", &path), 3, "{:?}", up.ranges(&path));
    assert!(m.stored(&d));
}

/// A URL that keeps cutting the same download off is given up on: the
/// client sees a broken transfer, never a complete wrong body, and nothing
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_never_gets_further_fails_instead_of_looping() {
    let up = FakeUpstream::start("127.0.11.108:0").await;
    let m = Mirror::start(8, &format!("url = \"{}\"", up.url())).await;
    let data = bytes_for("stuck", 100_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.cut_at(&path, &[50_000; 10]);
    let got = stream_all(client(), m.url("app", &format!("blobs/{d}"))).await;
    match got {
        Err(_) => {}
        Ok((status, body)) => assert!(status >= 500 && body != data, "{status}: a complete body"),
    }
    assert!(!m.stored(&d));
    let gets = up.count("GET", &path);
    assert!(
        (2..=5).contains(&gets),
        "{gets} GETs for a download stuck at one offset"
    );
}

/// Chained behind another cache, which answers 404 to a HEAD of a blob it
/// has not fetched yet: regmirror confirms with a GET before answering 404,
/// and the client's GET that follows joins that download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_head_404_upstream_is_confirmed_with_a_get() {
    let up = FakeUpstream::start("127.0.11.109:0").await;
    let m = Mirror::start(9, &format!("url = \"{}\"", up.url())).await;
    let c = client();
    let data = bytes_for("chained", 70_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.set_fault(&path, Fault::HeadNotFound);
    let url = m.url("app", &format!("blobs/{d}"));
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "a blob upstream serves was answered 404");
    assert_eq!(header(&r, "content-length"), Some("70000"));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
    let (status, body) = get_body(&c, &url).await;
    assert_eq!((status, body == data), (200, true));
    assert_eq!(up.count("GET", &path), 1, "the GET after the HEAD fetched again");

    // Absent upstream for both: still a 404, with the OCI code.
    let missing = digest_of(b"nowhere upstream");
    let r = c.head(m.url("app", &format!("blobs/{missing}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(up.count("GET", &format!("/v2/library/app/blobs/{missing}")), 1);
}

/// A download that stalls (no byte for the idle timeout, 60 s) is aborted
/// and resumed on the next URL: the client waiting on it gets every byte.
/// This test takes a little over a minute: the timeout is not configurable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_is_resumed_on_the_next_url() {
    let first = FakeUpstream::start("127.0.11.110:0").await;
    let second = FakeUpstream::start("127.0.11.160:0").await;
    let m = Mirror::start(10, &format!("urls = [\"{}\", \"{}\"]", first.url(), second.url())).await;
    let data = big_blob(10, 4 << 20);
    let (d, path) = blob_on_all(&[&first, &second], &data);
    // The first sends half the body, then nothing until the gate opens (never).
    first.gate(&path);
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(150))
        .build()
        .expect("reqwest client");
    let (status, body) = stream_all(c, m.url("app", &format!("blobs/{d}")))
        .await
        .unwrap_or_else(|e| panic!("the transfer broke: {e}"));
    assert_eq!(status, 200);
    assert!(body == data, "{} bytes that differ from the blob", body.len());
    assert_eq!(first.count("GET", &path), 1);
    let resumed = second.ranges(&path);
    assert!(
        resumed.len() == 1
            && resumed[0]
                .as_deref()
                .is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-"),
        "the second URL was not asked for the rest: {resumed:?}"
    );
    assert!(m.stored(&d));
}

/// Each URL has its own token challenge and token cache: a mirror behind a
/// realm of its own gets tokens from that realm, never the first URL's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_url_gets_tokens_from_its_own_realm() {
    let first = FakeUpstream::start("127.0.11.111:0").await;
    let second = FakeUpstream::start("127.0.11.161:0").await;
    first.require_bearer(true);
    second.require_bearer(true);
    let m = Mirror::start(11, &format!("urls = [\"{}\", \"{}\"]", first.url(), second.url())).await;
    // Anonymous token from regmirror itself, as docker would get before a pull.
    let c = client();
    let token: serde_json::Value = serde_json::from_slice(
        &c.get(format!("{}/token?scope=repository:dockerhub/library/app:pull", m.base))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap_or_else(|e| panic!("token answer: {e}"));
    let bearer = token["token"]
        .as_str()
        .or(token["access_token"].as_str())
        .unwrap_or("")
        .to_string();
    let get = |url: String| {
        let (c, bearer) = (c.clone(), bearer.clone());
        async move {
            let mut rb = c.get(url);
            if !bearer.is_empty() {
                rb = rb.bearer_auth(bearer);
            }
            let r = rb.send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
        }
    };

    let data = bytes_for("realm-1", 3_000);
    let (d, _) = blob_on_all(&[&first, &second], &data);
    let (status, body) = get(m.url("app", &format!("blobs/{d}"))).await;
    assert_eq!(
        (status, body == data),
        (200, true),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        !first.token_requests().is_empty(),
        "no token from the first URL's realm"
    );

    // The first fails this blob: the second is asked, with a token of its own.
    let data = bytes_for("realm-2", 3_001);
    let (d, path) = blob_on_all(&[&first, &second], &data);
    first.set_fault(&path, Fault::Status(500));
    let (status, body) = get(m.url("app", &format!("blobs/{d}"))).await;
    assert_eq!(
        (status, body == data),
        (200, true),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        !second.token_requests().is_empty(),
        "the second URL was sent the first URL's token instead of getting its own"
    );
    let sent = second
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path == path && s.status == 200)
        .count();
    assert_eq!(sent, 1, "{:?}", second.seen());
    let refused: Vec<_> = second
        .seen()
        .into_iter()
        .filter(|s| s.authorization.is_some() && s.status == 401)
        .collect();
    assert!(
        refused.is_empty(),
        "the second URL refused tokens it never issued: {refused:?}"
    );
}
