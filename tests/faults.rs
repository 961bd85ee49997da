//! Fault-injection and protocol tests: regmirror in-process in front of a
//! fake upstream that misbehaves on demand (see `fake_upstream`).
//!
//! Each test runs its own regmirror on `127.0.3.<n>:5000` (distinct `n` per
//! test) with its own cache directory, and its fakes on `127.0.3.<100+n>:0`
//! and `127.0.3.<150+n>:0`. Everything a test starts stops when the test's
//! runtime is dropped, and explicitly on drop of the handles.

#[path = "fake_upstream/mod.rs"]
mod fake_upstream;
mod in_process;

use std::path::PathBuf;
use std::time::Duration;

use fake_upstream::{bytes_for, digest_of, FakeUpstream, Fault, Resource};
use in_process::{client, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

// ---------------------------------------------------------------- harness

struct Mirror {
    /// First, so it stops before the store directory goes.
    served: in_process::Served,
    ip: String,
    base: String,
    dir: tempfile::TempDir,
}

impl Mirror {
    /// Starts regmirror on `127.0.3.<n>:5000` with one upstream (docker.io,
    /// namespace `dockerhub`) at `upstream_url`, and waits until it answers.
    async fn start(n: u8, upstream_url: &str) -> Mirror {
        Mirror::start_with(n, upstream_url, "").await
    }

    /// As [`start`](Self::start), with `upstream_keys` (TOML lines) added to
    /// the upstream's table.
    async fn start_with(n: u8, upstream_url: &str, upstream_keys: &str) -> Mirror {
        let ip = format!("127.0.3.{n}");
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
max_size = "1GiB"
[[upstream]]
name = "docker.io"
hosts = ["registry-1.docker.io", "docker.io"]
url = "{upstream_url}"
namespace = "dockerhub"
{upstream_keys}
"#
        );
        let served = in_process::Served::start(&ip, &toml, "faults test").await;
        Mirror {
            base: served.base.clone(),
            ip,
            dir,
            served,
        }
    }

    /// URL of `/v2/dockerhub/library/<repo>/<rest>` (explicit prefix mode).
    fn url(&self, repo: &str, rest: &str) -> String {
        format!("{}/v2/dockerhub/library/{repo}/{rest}", self.base)
    }

    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir.path().join("data/blobs/sha256").join(&hex[..2]).join(hex)
    }

    fn stored(&self, digest: &str) -> bool {
        self.blob_file(digest).exists()
    }

    fn tmp_files(&self) -> Vec<String> {
        match std::fs::read_dir(self.dir.path().join("data/tmp")) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A client that did the token dance with regmirror without credentials,
/// as docker or podman would before pulling a public image from an
/// upstream that authenticates.
async fn anonymous_client(m: &Mirror) -> reqwest::Client {
    let body = client()
        .get(format!("{}/token?scope=repository:dockerhub/library/app:pull", m.base))
        .send()
        .await
        .expect("token endpoint answers")
        .bytes()
        .await
        .expect("token body");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("token JSON");
    client_with_auth(&format!("Bearer {}", v["token"].as_str().expect("a token")))
}

fn client_with_auth(authorization: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        "authorization",
        reqwest::header::HeaderValue::from_str(authorization).expect("header"),
    );
    reqwest::Client::builder()
        .no_proxy()
        .default_headers(h)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

fn assert_api_version(r: &reqwest::Response) {
    assert_eq!(
        header(r, "docker-distribution-api-version"),
        Some("registry/2.0"),
        "{} {} lacks Docker-Distribution-API-Version",
        r.status(),
        r.url()
    );
}

/// Reads an error response: (status, errors[0].code), checking it is OCI error JSON.
async fn oci_error(r: reqwest::Response) -> (u16, String) {
    assert_api_version(&r);
    let status = r.status().as_u16();
    let url = r.url().to_string();
    let body = r.bytes().await.expect("error body");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status} from {url} is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {v}"))
        .to_string();
    assert!(v["errors"][0]["message"].is_string(), "no errors[0].message in {v}");
    (status, code)
}

/// How a GET ended from the client's point of view.
#[derive(Debug)]
enum Outcome {
    /// The response arrived whole (its framing says so).
    Complete { status: u16, body: Vec<u8> },
    /// The transfer broke: before the headers (`status` None) or in the body.
    Broken { status: Option<u16>, received: usize },
}

async fn outcome(rb: reqwest::RequestBuilder) -> Outcome {
    let mut resp = match rb.send().await {
        Ok(r) => r,
        Err(_) => {
            return Outcome::Broken {
                status: None,
                received: 0,
            }
        }
    };
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => return Outcome::Complete { status, body },
            Err(_) => {
                return Outcome::Broken {
                    status: Some(status),
                    received: body.len(),
                }
            }
        }
    }
}

/// A bad download must reach the client as an error: a broken transfer, or a
/// complete 5xx OCI error; never a complete 2xx.
fn assert_not_served(o: &Outcome, what: &str, full_len: usize) {
    match o {
        Outcome::Complete { status, body } => {
            assert!(
                (500..600).contains(status),
                "{what}: client got a complete {status} ({} bytes) for bad upstream content",
                body.len()
            );
            let v: serde_json::Value =
                serde_json::from_slice(body).unwrap_or_else(|_| panic!("{what}: {status} body is not OCI error JSON"));
            assert!(v["errors"][0]["code"].is_string(), "{what}: {v}");
        }
        Outcome::Broken { status, received } => {
            assert!(
                *received < full_len,
                "{what}: all {full_len} bytes were delivered (status {status:?}) before the error"
            );
        }
    }
}

async fn get_ok(c: &reqwest::Client, url: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let r = c.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status(), 200, "GET {url}");
    assert_api_version(&r);
    let h = r.headers().clone();
    let b = r
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {url} body: {e}"))
        .to_vec();
    (h, b)
}

fn manifest_bytes(seed: &str) -> Vec<u8> {
    let config = digest_of(seed.as_bytes());
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{}}},"layers":[]}}"#,
        seed.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------- 1, 2: bad bodies

/// Rule 6: a corrupt download is never served complete, never stored, and a
/// later request (upstream fixed) fetches again and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_is_never_served_or_stored() {
    let up = FakeUpstream::start("127.0.3.110:0").await;
    let m = Mirror::start(10, &up.url()).await;
    let c = client();
    let data = bytes_for("corrupt", 200_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.set_fault(&path, Fault::Corrupt);

    let url = m.url("app", &format!("blobs/{d}"));
    let o = outcome(c.get(&url)).await;
    assert_not_served(&o, "corrupt blob", data.len());
    assert!(
        !m.stored(&d),
        "corrupt content was committed to {}",
        m.blob_file(&d).display()
    );
    assert!(m.tmp_files().is_empty(), "temp file left behind: {:?}", m.tmp_files());
    assert_eq!(up.count("GET", &path), 1);

    // Upstream fixed: a new fetch, the right bytes, stored.
    up.clear_fault(&path);
    let (h, body) = get_ok(&c, &url).await;
    assert_eq!(
        up.count("GET", &path),
        2,
        "the failed download was remembered instead of retried"
    );
    assert_eq!(digest_of(&body), d);
    assert_eq!(h.get("docker-content-digest").unwrap(), d.as_str());
    assert!(m.stored(&d));
    assert_eq!(std::fs::read(m.blob_file(&d)).unwrap(), data);
}

/// Rule 6: short bodies (announced length not reached, chunked body cut,
/// chunked body that ends early) are errors, not stored, and retried later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_dropped_blob_is_never_served_or_stored() {
    let up = FakeUpstream::start("127.0.3.111:0").await;
    // One GET per request, so the count below is the fetches made.
    let m = Mirror::start_with(11, &up.url(), "retries = 0").await;
    let c = client();
    for (i, fault) in [Fault::Truncate, Fault::DropMidBody, Fault::ShortChunked]
        .into_iter()
        .enumerate()
    {
        let data = bytes_for(&format!("short-{i}"), 150_000 + i);
        let (d, path) = up.add_blob("library/app", &data);
        up.set_fault(&path, fault.clone());
        let url = m.url("app", &format!("blobs/{d}"));

        let o = outcome(c.get(&url)).await;
        assert_not_served(&o, &format!("{fault:?}"), data.len());
        assert!(!m.stored(&d), "{fault:?}: short content was committed");
        assert!(m.tmp_files().is_empty(), "{fault:?}: temp file left behind");

        up.clear_fault(&path);
        let (_, body) = get_ok(&c, &url).await;
        assert_eq!(body, data, "{fault:?}: wrong bytes after upstream recovered");
        assert_eq!(up.count("GET", &path), 2, "{fault:?}");
        assert!(m.stored(&d), "{fault:?}");
    }
}

/// Rule 6, the case that matters most: a client already receiving a 200
/// when the download breaks sees a broken transfer, never a complete body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_download_reaches_an_attached_client_as_a_broken_transfer() {
    let up = FakeUpstream::start("127.0.3.112:0").await;
    let m = Mirror::start(12, &up.url()).await;
    let c = client();
    let mut blobs = Vec::new();
    for (i, fault) in [Fault::DropMidBody, Fault::Corrupt, Fault::Truncate]
        .into_iter()
        .enumerate()
    {
        let data = bytes_for(&format!("attached-{i}"), 300_000);
        let (d, path) = up.add_blob("library/app", &data);
        up.set_fault(&path, fault.clone());
        up.gate(&path);
        blobs.push((fault, data, d, path));
    }
    // Every client has its 200 headers while the downloads are stalled half-way.
    let mut responses = Vec::new();
    for (fault, data, d, _) in &blobs {
        let r = c
            .get(m.url("app", &format!("blobs/{d}")))
            .send()
            .await
            .expect("headers");
        assert_eq!(r.status(), 200, "{fault:?}: headers are sent while the download grows");
        if *fault != Fault::DropMidBody {
            // Upstream announced the length, so regmirror does too.
            assert_eq!(
                header(&r, "content-length"),
                Some(data.len().to_string().as_str()),
                "{fault:?}"
            );
        }
        responses.push(r);
    }
    up.open_gate();
    for ((fault, data, d, _), mut r) in blobs.iter().zip(responses) {
        let mut got = 0usize;
        let err = loop {
            match r.chunk().await {
                Ok(Some(ch)) => got += ch.len(),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        assert!(err.is_some(), "{fault:?}: the client saw a complete 200 of {got} bytes");
        assert!(got < data.len(), "{fault:?}");
        assert!(!m.stored(d), "{fault:?}");
    }
}

// ---------------------------------------------------------------- 3, 4: tags

/// Rule 2: upstream 500, 429 or unreachable on a tag seen before → the last
/// digest with `Warning: 110`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_upstream_failure_serves_the_last_digest_with_a_warning() {
    let up = FakeUpstream::start("127.0.3.113:0").await;
    let m = Mirror::start(13, &up.url()).await;
    let c = client();
    let manifest = manifest_bytes("stale");
    let d = up.add_manifest("library/app", Some("v1"), OCI_MANIFEST, &manifest);
    let tag_path = "/v2/library/app/manifests/v1";
    let url = m.url("app", "manifests/v1");
    let get = || c.get(&url).header("accept", OCI_MANIFEST);

    let r = get().send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("warning").is_none(), "fresh answer carries a Warning");
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(r.bytes().await.unwrap(), manifest);

    let check_stale = |r: reqwest::Response, why: &'static str| {
        let d = d.clone();
        let manifest = manifest.clone();
        async move {
            assert_eq!(r.status(), 200, "{why}: stale tag not served");
            assert_api_version(&r);
            let w = header(&r, "warning").unwrap_or_else(|| panic!("{why}: no Warning header"));
            assert!(w.starts_with("110 "), "{why}: Warning {w:?}");
            assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()), "{why}");
            assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST), "{why}");
            assert_eq!(r.bytes().await.unwrap(), manifest, "{why}");
        }
    };

    up.set_fault(tag_path, Fault::Status(500));
    check_stale(get().send().await.unwrap(), "500").await;
    let r = c.head(&url).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200, "HEAD on a stale tag");
    assert!(header(&r, "warning").is_some_and(|w| w.starts_with("110 ")));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));

    up.set_fault(tag_path, Fault::TooMany { retry_after: 7 });
    check_stale(get().send().await.unwrap(), "429").await;

    up.set_fault(tag_path, Fault::Status(503));
    check_stale(get().send().await.unwrap(), "503").await;

    // Not an upstream failure: a 404 means the tag is gone, and says so.
    up.set_fault(tag_path, Fault::Status(404));
    let (status, code) = oci_error(get().send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));

    // Upstream gone altogether.
    up.clear_fault(tag_path);
    let digest_gets = up.count("GET", &format!("/v2/library/app/manifests/{d}"));
    assert_eq!(digest_gets, 1, "the digest was fetched once");
    up.stop().await;
    check_stale(get().send().await.unwrap(), "unreachable").await;
}

/// Rule 2, second half: never seen → an OCI error with a gateway status (or
/// 429 with Retry-After), not a panic and not a stale answer for another Accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_upstream_failure_without_history_is_an_oci_error() {
    let up = FakeUpstream::start("127.0.3.114:0").await;
    let m = Mirror::start(14, &up.url()).await;
    let c = client();
    up.add_manifest("library/app", Some("v1"), OCI_MANIFEST, &manifest_bytes("never"));
    let tag_path = "/v2/library/app/manifests/v1";
    let url = m.url("app", "manifests/v1");

    up.set_fault(tag_path, Fault::Status(500));
    let (status, code) = oci_error(c.get(&url).send().await.unwrap()).await;
    assert!((500..600).contains(&status), "500 upstream → {status}");
    assert_eq!(code, "UNAVAILABLE");

    up.set_fault(tag_path, Fault::TooMany { retry_after: 7 });
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(header(&r, "retry-after"), Some("7"), "Retry-After is passed on");
    let (status, code) = oci_error(r).await;
    assert_eq!((status, code.as_str()), (429, "TOOMANYREQUESTS"));

    // Seen for one Accept, failing for another: not served across Accept values.
    up.clear_fault(tag_path);
    let r = c.get(&url).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200);
    up.set_fault(tag_path, Fault::Status(500));
    let r = c
        .get(&url)
        .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers().get("warning").is_none(),
        "served a stale answer recorded for another Accept"
    );
    let (status, _) = oci_error(r).await;
    assert!((500..600).contains(&status));

    // Unreachable upstream, tag never seen.
    up.stop().await;
    let (status, code) = oci_error(c.get(m.url("other", "manifests/v1")).send().await.unwrap()).await;
    assert!((500..600).contains(&status), "unreachable upstream → {status}");
    assert_eq!(code, "UNAVAILABLE");
}

/// Rule 1: a tag whose digest is cached costs upstream one HEAD, no GET; in
/// transparent mode (Host header) and for the short Docker Hub name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tag_costs_upstream_only_a_head() {
    let up = FakeUpstream::start("127.0.3.115:0").await;
    let m = Mirror::start(15, &up.url()).await;
    let c = client();
    let manifest = manifest_bytes("head-only");
    let d = up.add_manifest("library/app", Some("v1"), OCI_MANIFEST, &manifest);
    let tag_path = "/v2/library/app/manifests/v1";
    let digest_path = format!("/v2/library/app/manifests/{d}");
    let transparent = |path: &str| {
        c.get(format!("{}{path}", m.base))
            .header("host", "registry-1.docker.io")
            .header("accept", OCI_MANIFEST)
    };

    let r = transparent("/v2/library/app/manifests/v1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), manifest);
    assert_eq!(
        (
            up.count("HEAD", tag_path),
            up.count("GET", tag_path),
            up.count("GET", &digest_path)
        ),
        (1, 0, 1)
    );

    for path in ["/v2/library/app/manifests/v1", "/v2/app/manifests/v1"] {
        let r = transparent(path).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_api_version(&r);
        assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
        assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.bytes().await.unwrap(), manifest, "{path}");
    }
    let r = c
        .head(format!("{}/v2/library/app/manifests/v1", m.base))
        .header("host", "registry-1.docker.io")
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), Some(manifest.len().to_string().as_str()));

    assert_eq!(up.count("HEAD", tag_path), 4, "one HEAD per tag request");
    assert_eq!(up.count("GET", tag_path), 0, "a cached tag cost a GET by tag");
    assert_eq!(up.count("GET", &digest_path), 1, "a cached manifest was fetched again");

    // By digest: no upstream request at all.
    let before = up.seen().len();
    let (h, body) = get_ok(&c, &m.url("app", &format!("manifests/{d}"))).await;
    assert_eq!(body, manifest);
    assert_eq!(h.get("content-type").unwrap(), OCI_MANIFEST);
    assert_eq!(up.seen().len(), before, "a cached digest manifest asked upstream");
}

// ---------------------------------------------------------------- 5: single flight

/// Rule 5: eight clients on one cold blob → one upstream GET; all eight get
/// the right bytes, all of them attached while the download was in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_fetch() {
    let up = FakeUpstream::start("127.0.3.116:0").await;
    let m = Mirror::start(16, &up.url()).await;
    let c = client();
    let data = bytes_for("single-flight", 512 * 1024);
    let (d, path) = up.add_blob("library/app", &data);
    up.gate(&path);
    let url = m.url("app", &format!("blobs/{d}"));

    let (tx, mut rx) = mpsc::channel(8);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url, tx) = (c.clone(), url.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.get(&url).send().await.expect("headers");
            let status = r.status().as_u16();
            tx.send(()).await.expect("signal");
            let body = r.bytes().await.map(|b| b.to_vec());
            (status, body)
        }));
    }
    drop(tx);
    // All eight have their headers while upstream is stalled half-way.
    for _ in 0..8 {
        rx.recv().await.expect("a client failed before its headers");
    }
    up.open_gate();
    for t in tasks {
        let (status, body) = t.await.expect("client task");
        assert_eq!(status, 200);
        let body = body.expect("body");
        assert_eq!(body.len(), data.len());
        assert_eq!(digest_of(&body), d);
    }
    assert_eq!(
        up.count("GET", &path),
        1,
        "concurrent misses made more than one upstream GET"
    );
    assert!(m.stored(&d));
}

/// Rule 5: the download goes on when its only client leaves: with nobody
/// attached any more it completes, is stored, and is then served as a hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_goes_on_when_the_client_leaves() {
    let up = FakeUpstream::start("127.0.3.117:0").await;
    let m = Mirror::start(17, &up.url()).await;
    let data = bytes_for("client-leaves", 400_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.gate(&path);

    // The only client gets its 200 while upstream is stalled half-way, then
    // hangs up; regmirror closing the connection in turn shows that it has
    // let go of the response before the download can go any further.
    let (mut conn, head, _) = raw_get(&m, &format!("/v2/dockerhub/library/app/blobs/{d}"), None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    conn.shutdown().await.expect("client hangs up");
    let hung_up = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest).await;
    })
    .await;
    assert!(
        hung_up.is_ok(),
        "regmirror still holds the connection of a client that left"
    );
    drop(conn);

    // Nobody is attached now: the download must finish on its own.
    up.open_gate();
    let stored = wait_stored(&m, &d).await;
    assert!(
        stored,
        "the download stopped when its only client left: {d} was never stored"
    );
    assert_eq!(up.count("GET", &path), 1, "the download was fetched more than once");

    // What was stored is served whole without asking upstream anything.
    let before = up.seen().len();
    let (_, body) = get_ok(&client(), &m.url("app", &format!("blobs/{d}"))).await;
    assert_eq!(body, data);
    assert_eq!(
        up.seen().len(),
        before,
        "the blob downloaded after its client left is not served from the cache"
    );
}

/// Polls the store until `digest` is committed there (up to 10 s).
async fn wait_stored(m: &Mirror, digest: &str) -> bool {
    for _ in 0..500 {
        if m.stored(digest) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Connects to the mirror's plain listener (with a receive buffer of
/// `rcvbuf` bytes when given, set before connecting so that the TCP window
/// stays that small), sends `GET target` and reads the response head.
/// Returns the connection, the head and the body bytes read along with it.
async fn raw_get(m: &Mirror, target: &str, rcvbuf: Option<u32>) -> (tokio::net::TcpStream, String, Vec<u8>) {
    let addr: std::net::SocketAddr = format!("{}:5000", m.ip).parse().expect("mirror address");
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(size) = rcvbuf {
        sock.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let mut conn = sock.connect(addr).await.expect("connect to regmirror");
    conn.write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await.expect("read response head");
        assert!(n > 0, "connection closed before the response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let body = buf.split_off(end);
    (conn, String::from_utf8_lossy(&buf).into_owned(), body)
}

// ---------------------------------------------------------------- 6, 7: Range and HEAD

/// Rule 7: single ranges (closed, open-ended, suffix) → 206 + Content-Range,
/// on a hit and on a miss; unsatisfiable → 416 with `bytes */SIZE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_on_hit_and_miss() {
    let up = FakeUpstream::start("127.0.3.118:0").await;
    let m = Mirror::start(18, &up.url()).await;
    let c = client();
    const SIZE: usize = 100;
    let cases: [(&str, usize, usize); 4] = [
        ("bytes=0-9", 0, 9),
        ("bytes=10-", 10, 99),
        ("bytes=-5", 95, 99),
        ("bytes=90-1000", 90, 99),
    ];

    let check = |r: reqwest::Response,
                 data: Vec<u8>,
                 spec: &'static str,
                 first: usize,
                 last: usize,
                 what: &'static str| async move {
        assert_eq!(r.status(), 206, "{what} {spec}");
        assert_api_version(&r);
        assert_eq!(
            header(&r, "content-range"),
            Some(format!("bytes {first}-{last}/{SIZE}").as_str()),
            "{what} {spec}"
        );
        assert_eq!(
            header(&r, "content-length"),
            Some((last + 1 - first).to_string().as_str()),
            "{what} {spec}"
        );
        assert_eq!(r.bytes().await.unwrap(), data[first..=last], "{what} {spec}");
    };

    // Hit: a stored blob.
    let hit = bytes_for("range-hit", SIZE);
    let (hd, hpath) = up.add_blob("library/app", &hit);
    let hurl = m.url("app", &format!("blobs/{hd}"));
    get_ok(&c, &hurl).await;
    for (spec, first, last) in cases {
        check(
            c.get(&hurl).header("range", spec).send().await.unwrap(),
            hit.clone(),
            spec,
            first,
            last,
            "hit",
        )
        .await;
    }
    for spec in ["bytes=100-", "bytes=-0", "bytes=5000-6000"] {
        let r = c.get(&hurl).header("range", spec).send().await.unwrap();
        assert_eq!(header(&r, "content-range"), Some("bytes */100"), "hit {spec}");
        let (status, _) = oci_error(r).await;
        assert_eq!(status, 416, "hit {spec}");
    }
    assert_eq!(up.count("GET", &hpath), 1);

    // Miss: each range the first request for its own cold blob.
    for (i, (spec, first, last)) in cases.into_iter().enumerate() {
        let data = bytes_for(&format!("range-miss-{i}"), SIZE);
        let (d, path) = up.add_blob("library/app", &data);
        let url = m.url("app", &format!("blobs/{d}"));
        check(
            c.get(&url).header("range", spec).send().await.unwrap(),
            data.clone(),
            spec,
            first,
            last,
            "miss",
        )
        .await;
        // The range was cut from the one download, which completed.
        let (_, body) = get_ok(&c, &url).await;
        assert_eq!(body, data);
        assert_eq!(up.count("GET", &path), 1, "miss {spec}: the range cost a second fetch");
    }
    let data = bytes_for("range-miss-416", SIZE);
    let (d, _) = up.add_blob("library/app", &data);
    let r = c
        .get(m.url("app", &format!("blobs/{d}")))
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-range"), Some("bytes */100"), "miss 416");
    let (status, _) = oci_error(r).await;
    assert_eq!(status, 416);
}

/// Rule 4: HEAD on a blob miss answers from an upstream HEAD (no GET, no
/// 404); HEAD on a hit asks nobody; a tag HEAD miss costs no GET either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_on_a_miss_asks_upstream_with_head() {
    let up = FakeUpstream::start("127.0.3.119:0").await;
    let m = Mirror::start(19, &up.url()).await;
    let c = client();
    let data = bytes_for("head-miss", 12_345);
    let (d, path) = up.add_blob("library/app", &data);
    let url = m.url("app", &format!("blobs/{d}"));

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "HEAD on a blob miss");
    assert_api_version(&r);
    assert_eq!(header(&r, "content-length"), Some("12345"));
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
    assert_eq!((up.count("HEAD", &path), up.count("GET", &path)), (1, 0));
    assert!(!m.stored(&d));

    // A blob upstream does not have: 404 (HEAD has no body to carry JSON).
    let missing = digest_of(b"nowhere");
    let r = c.head(m.url("app", &format!("blobs/{missing}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_api_version(&r);

    // Cached: HEAD asks nobody and gives the same headers as GET.
    let (gh, _) = get_ok(&c, &url).await;
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    for h in ["content-length", "docker-content-digest", "content-type", "etag"] {
        assert_eq!(r.headers().get(h), gh.get(h), "HEAD and GET differ in {h}");
    }
    assert_eq!((up.count("HEAD", &path), up.count("GET", &path)), (1, 1));

    // Tag manifest HEAD miss: digest and length from upstream's HEAD, no GET.
    let manifest = manifest_bytes("head-tag");
    let md = up.add_manifest("library/app", Some("v2"), OCI_MANIFEST, &manifest);
    let r = c
        .head(m.url("app", "manifests/v2"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), Some(md.as_str()));
    assert_eq!(header(&r, "content-length"), Some(manifest.len().to_string().as_str()));
    assert_eq!(up.count("GET", "/v2/library/app/manifests/v2"), 0);
    assert_eq!(up.count("GET", &format!("/v2/library/app/manifests/{md}")), 0);
}

// ---------------------------------------------------------------- 8, 9: redirects, tokens

/// Rule 8: a 307 to a CDN is followed inside regmirror; the token sent to
/// the registry is not sent to the CDN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_without_leaking_authorization() {
    let up = FakeUpstream::start("127.0.3.120:0").await;
    let cdn = FakeUpstream::start("127.0.3.170:0").await;
    // The CDN is on loopback: allowed only because the upstream names it.
    let m = Mirror::start_with(20, &up.url(), r#"private_redirect_hosts = ["127.0.3.170"]"#).await;
    up.require_bearer(true);
    let c = anonymous_client(&m).await;

    let data = bytes_for("via-cdn", 70_000);
    let (d, path) = up.add_blob("library/app", &data);
    let cdn_path = "/cdn/layer-1?sig=abc";
    cdn.put(
        "/cdn/layer-1",
        Resource {
            body: data.clone().into(),
            content_type: "application/octet-stream".into(),
            digest: None,
        },
    );
    up.set_fault(&path, Fault::Redirect(format!("{}{cdn_path}", cdn.url())));
    let url = m.url("app", &format!("blobs/{d}"));

    let (_, body) = get_ok(&c, &url).await;
    assert_eq!(body, data);
    assert_eq!(cdn.count("GET", "/cdn/layer-1"), 1);
    let authorized = up.seen().iter().any(|s| {
        s.path == path && s.status == 307 && s.authorization.as_deref().is_some_and(|a| a.starts_with("Bearer "))
    });
    assert!(authorized, "the registry never saw the token: the test proves nothing");
    for s in cdn.seen() {
        assert_eq!(
            s.authorization, None,
            "the CDN received Authorization on {} {}",
            s.method, s.path
        );
    }

    // Cached now: neither the registry nor the CDN is asked again.
    let (reg_before, cdn_before) = (up.count("GET", &path), cdn.seen().len());
    let (_, body) = get_ok(&c, &url).await;
    assert_eq!(body, data);
    assert_eq!((up.count("GET", &path), cdn.seen().len()), (reg_before, cdn_before));

    // HEAD on a miss follows the redirect too.
    let data2 = bytes_for("via-cdn-head", 4_321);
    let (d2, path2) = up.add_blob("library/app", &data2);
    cdn.put(
        "/cdn/layer-2",
        Resource {
            body: data2.into(),
            content_type: "application/octet-stream".into(),
            digest: None,
        },
    );
    up.set_fault(&path2, Fault::Redirect(format!("{}/cdn/layer-2", cdn.url())));
    let r = c.head(m.url("app", &format!("blobs/{d2}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), Some("4321"));
    assert_eq!(cdn.count("HEAD", "/cdn/layer-2"), 1);
    for s in cdn.seen() {
        assert_eq!(
            s.authorization, None,
            "the CDN received Authorization on {} {}",
            s.method, s.path
        );
    }
}

/// Rule 9: Bearer challenge → one token per scope, reused for later requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_fetched_once_per_scope() {
    let up = FakeUpstream::start("127.0.3.121:0").await;
    let m = Mirror::start(21, &up.url()).await;
    up.require_bearer(true);
    let c = anonymous_client(&m).await;

    let b1 = bytes_for("tok-b1", 1000);
    let b2 = bytes_for("tok-b2", 2000);
    let b3 = bytes_for("tok-b3", 3000);
    let (d1, _) = up.add_blob("library/app", &b1);
    let (d2, _) = up.add_blob("library/app", &b2);
    let (d3, _) = up.add_blob("library/app", &b3);
    let manifest = manifest_bytes("tok-manifest");
    up.add_manifest("library/app", Some("v1"), OCI_MANIFEST, &manifest);

    assert_eq!(get_ok(&c, &m.url("app", &format!("blobs/{d1}"))).await.1, b1);
    assert_eq!(get_ok(&c, &m.url("app", &format!("blobs/{d2}"))).await.1, b2);
    let r = c
        .get(m.url("app", "manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), manifest);
    let r = c.head(m.url("app", &format!("blobs/{d3}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.token_requests(),
        vec!["repository:library/app:pull".to_string()],
        "one token for one scope"
    );

    // Another repository is another scope: one more token, and its own.
    let other = bytes_for("tok-other", 500);
    let (od, _) = up.add_blob("library/other", &other);
    assert_eq!(get_ok(&c, &m.url("other", &format!("blobs/{od}"))).await.1, other);
    let b4 = bytes_for("tok-b4", 4000);
    let (d4, _) = up.add_blob("library/app", &b4);
    assert_eq!(get_ok(&c, &m.url("app", &format!("blobs/{d4}"))).await.1, b4);
    assert_eq!(
        up.token_requests(),
        vec![
            "repository:library/app:pull".to_string(),
            "repository:library/other:pull".to_string()
        ]
    );

    // Every request upstream answered with content carried a token.
    for s in up.seen() {
        if s.path.starts_with("/v2/") && s.status == 200 {
            assert!(
                s.authorization.as_deref().is_some_and(|a| a.starts_with("Bearer tok-")),
                "{} {} without a token",
                s.method,
                s.path
            );
        }
    }
}

// ---------------------------------------------------------------- 10, 11: bad input, loops

struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request with the path exactly as given (reqwest would
/// normalise `..` away) and reads the whole response.
async fn raw_request(addr: &str, method: &str, target: &str) -> RawResponse {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req =
        format!("{method} {target} HTTP/1.1\r\nHost: regmirror.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        body = out;
    }
    RawResponse { status, headers, body }
}

/// Rules 12, 13 and the security section: malformed names, digests, paths,
/// unknown `ns` and pushes are refused with an OCI error, before anything
/// reaches upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_oci_errors() {
    let up = FakeUpstream::start("127.0.3.122:0").await;
    let m = Mirror::start(22, &up.url()).await;
    let addr = format!("{}:5000", m.ip);
    let good = digest_of(b"x");
    let cases: Vec<(&str, String, &[u16])> = vec![
        ("GET", "/v2/../../etc/passwd".into(), &[400, 404]),
        (
            "GET",
            "/v2/dockerhub/library/x/../../../../etc/passwd/manifests/1".into(),
            &[400, 404],
        ),
        ("GET", "/v2/dockerhub/library/x/blobs/sha256:zz".into(), &[400]),
        (
            "GET",
            "/v2/dockerhub/library/x/blobs/sha256:../../../../etc/passwd".into(),
            &[400, 404],
        ),
        ("GET", "/v2/dockerhub/library/x/blobs/md5:00".into(), &[400]),
        ("GET", "/v2/dockerhub/library/x/blobs/sha256:00".into(), &[400]),
        ("GET", "/v2/dockerhub/Library/X/manifests/1".into(), &[400]),
        ("GET", "/v2/dockerhub/library/x/manifests/-bad".into(), &[400]),
        ("GET", "/v2/library/x/manifests/1?ns=evil.example".into(), &[400, 404]),
        ("GET", "/v2/dockerhub%2flibrary%2fx/manifests/1".into(), &[400, 404]),
        ("GET", "/v2/dockerhub/library/x/%2e%2e/manifests/1".into(), &[400, 404]),
        ("GET", "/v2//library/x/manifests/1".into(), &[400, 404]),
        ("GET", "/etc/passwd".into(), &[404]),
        ("POST", "/v2/dockerhub/library/x/blobs/uploads/".into(), &[405]),
        ("PUT", "/v2/dockerhub/library/x/manifests/1".into(), &[405]),
        ("DELETE", format!("/v2/dockerhub/library/x/blobs/{good}"), &[405]),
        ("PATCH", "/v2/dockerhub/library/x/blobs/uploads/abc".into(), &[405]),
    ];
    for (method, target, allowed) in &cases {
        let r = raw_request(&addr, method, target).await;
        assert!(
            allowed.contains(&r.status),
            "{method} {target} → {} (want one of {allowed:?})",
            r.status
        );
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0"),
            "{method} {target}"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| {
            panic!(
                "{method} {target}: body is not JSON: {}",
                String::from_utf8_lossy(&r.body)
            )
        });
        assert!(
            v["errors"][0]["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{method} {target}: {v}"
        );
    }
    assert!(up.seen().is_empty(), "bad input reached upstream: {:?}", up.seen());

    // Successful answers carry the header too.
    let r = raw_request(&addr, "GET", "/v2/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("docker-distribution-api-version"), Some("registry/2.0"));
}

/// Rule 15: an upstream that resolves to regmirror itself is answered 508,
/// once, instead of looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_back_to_regmirror_is_answered_508() {
    let m = Mirror::start(23, "http://127.0.3.23:5000").await;
    let c = client();
    let d = digest_of(b"loop");
    for (what, rb) in [
        ("blob GET", c.get(m.url("app", &format!("blobs/{d}")))),
        ("tag GET", c.get(m.url("app", "manifests/v1"))),
        ("digest manifest GET", c.get(m.url("app", &format!("manifests/{d}")))),
        ("tags/list", c.get(m.url("app", "tags/list"))),
    ] {
        let r = rb.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let (status, _) = oci_error(r).await;
        assert_eq!(status, 508, "{what}");
    }
    let r = c.head(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 508, "blob HEAD");
}

// ---------------------------------------------------------------- 12: tags/list

/// Rule 2 for tag lists: the last answer is served with a Warning when
/// upstream fails; never answered before → an OCI error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_is_served_stale_when_upstream_fails() {
    let up = FakeUpstream::start("127.0.3.124:0").await;
    // One GET per request, so the count below is the requests that asked.
    let m = Mirror::start_with(24, &up.url(), "retries = 0").await;
    let c = client();
    let list_path = "/v2/library/app/tags/list";
    up.put(
        list_path,
        Resource {
            body: r#"{"name":"library/app","tags":["1","2","latest"]}"#.into(),
            content_type: "application/json".into(),
            digest: None,
        },
    );
    let url = m.url("app", "tags/list");

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("warning").is_none());
    let fresh: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(fresh["name"], "dockerhub/library/app", "name is the client's");
    assert_eq!(fresh["tags"], serde_json::json!(["1", "2", "latest"]));

    for fault in [Fault::Status(500), Fault::TooMany { retry_after: 3 }] {
        up.set_fault(list_path, fault.clone());
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{fault:?}");
        assert_api_version(&r);
        assert!(
            header(&r, "warning").is_some_and(|w| w.starts_with("110 ")),
            "{fault:?}: no Warning: 110"
        );
        let stale: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(stale, fresh, "{fault:?}");
    }
    assert_eq!(
        up.count("GET", list_path),
        3,
        "tags/list is always asked of upstream first"
    );

    // Another query is another answer: never seen, so an error.
    let r = c.get(format!("{url}?n=1")).send().await.unwrap();
    let (status, code) = oci_error(r).await;
    assert!(status == 429 || (500..600).contains(&status), "{status}");
    assert!(!code.is_empty());

    // Never answered: an OCI error.
    up.set_fault("/v2/library/other/tags/list", Fault::Status(500));
    let (status, code) = oci_error(c.get(m.url("other", "tags/list")).send().await.unwrap()).await;
    assert!((500..600).contains(&status), "{status}");
    assert!(!code.is_empty());
}

/// Rule 1, fallback: when upstream's HEAD names no digest, one GET by tag,
/// served and stored under the digest of its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_head_without_digest_falls_back_to_one_get() {
    let up = FakeUpstream::start("127.0.3.125:0").await;
    let m = Mirror::start(25, &up.url()).await;
    let c = client();
    let manifest = manifest_bytes("no-digest-header");
    let d = digest_of(&manifest);
    let tag_path = "/v2/library/app/manifests/v1";
    up.put(
        tag_path,
        Resource {
            body: manifest.clone().into(),
            content_type: OCI_MANIFEST.into(),
            digest: None,
        },
    );

    let r = c
        .get(m.url("app", "manifests/v1"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "docker-content-digest"), Some(d.as_str()));
    assert_eq!(header(&r, "content-type"), Some(OCI_MANIFEST));
    assert_eq!(r.bytes().await.unwrap(), manifest);
    assert_eq!((up.count("HEAD", tag_path), up.count("GET", tag_path)), (1, 1));
    assert!(
        m.stored(&d),
        "the manifest fetched by tag was not stored under its digest"
    );

    // Now reachable by digest without asking upstream.
    let before = up.seen().len();
    let (_, body) = get_ok(&c, &m.url("app", &format!("manifests/{d}"))).await;
    assert_eq!(body, manifest);
    assert_eq!(up.seen().len(), before);
}

// ---------------------------------------------------------------- graceful shutdown

/// After the shutdown signal no new connection is accepted, and a download
/// already streaming to a client finishes intact before `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_streaming_download_finish_and_refuses_new_connections() {
    let up = FakeUpstream::start("127.0.3.126:0").await;
    let mut m = Mirror::start(26, &up.url()).await;
    let c = client();
    let data = bytes_for("shutdown", 2_000_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.gate(&path);

    let mut resp = c.get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = resp
        .chunk()
        .await
        .unwrap()
        .expect("first bytes before the gate")
        .to_vec();

    m.served.stop();
    // The listener closes promptly; poll rather than guess how promptly.
    let addr = format!("{}:5000", m.ip);
    let mut refused = false;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "new connections must be refused after the shutdown signal");

    up.open_gate();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, data, "the in-flight download must complete intact");
    let served = tokio::time::timeout(Duration::from_secs(30), &mut m.served.task).await;
    assert!(
        matches!(served, Ok(Ok(Ok(())))),
        "serve returns once open connections are done: {served:?}"
    );
}

// ---------------------------------------------------------------- catalog

/// `/v2/_catalog` lists what regmirror holds: through the upstream's host in
/// upstream names, on the proxy's own address with the namespace prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_cached_repositories() {
    let up = FakeUpstream::start("127.0.3.127:0").await;
    let m = Mirror::start(27, &up.url()).await;
    let c = client();
    let manifest = manifest_bytes("catalog");
    up.add_manifest("library/app", Some("v1"), OCI_MANIFEST, &manifest);
    up.add_manifest("org/tool", Some("2"), OCI_MANIFEST, &manifest);

    let catalog = |host: Option<&'static str>| {
        let mut req = c.get(format!("{}/v2/_catalog", m.base));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        async move {
            let body = req.send().await.unwrap().bytes().await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["repositories"].clone()
        }
    };
    assert_eq!(catalog(None).await, serde_json::json!([]));

    for path in ["library/app/manifests/v1", "org/tool/manifests/2"] {
        let url = format!("{}/v2/dockerhub/{path}", m.base);
        let r = c.get(&url).header("accept", "*/*").send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        assert_eq!(r.bytes().await.unwrap(), manifest);
    }
    assert_eq!(
        catalog(None).await,
        serde_json::json!(["dockerhub/library/app", "dockerhub/org/tool"])
    );
    assert_eq!(
        catalog(Some("registry-1.docker.io")).await,
        serde_json::json!(["library/app", "org/tool"])
    );
}

/// Oversized request headers get an OCI error (431), not a bare status or a
/// dropped connection, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_an_oci_error() {
    let up = FakeUpstream::start("127.0.3.128:0").await;
    let m = Mirror::start(28, &up.url()).await;
    let c = client();
    let r = c
        .get(format!("{}/v2/", m.base))
        .header("x-filler", "a".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
    let body = r.bytes().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("limit"), "{v}");
    assert_eq!(c.get(format!("{}/v2/", m.base)).send().await.unwrap().status(), 200);
    let reached: Vec<_> = up.seen().into_iter().filter(|s| s.path != "/v2/").collect();
    assert!(reached.is_empty(), "nothing but the ping reached upstream: {reached:?}");
}

/// Rule 14: blobs go out with identity encoding whatever the client asks
/// for; the digest covers the raw bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_served_with_identity_encoding() {
    let up = FakeUpstream::start("127.0.3.129:0").await;
    let m = Mirror::start(29, &up.url()).await;
    let c = client();
    let data = bytes_for("identity", 300_000);
    let (d, _) = up.add_blob("library/app", &data);
    for round in ["miss", "hit"] {
        let r = c
            .get(m.url("app", &format!("blobs/{d}")))
            .header("accept-encoding", "gzip, br, zstd")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{round}");
        assert!(
            r.headers().get("content-encoding").is_none(),
            "{round}: {:?}",
            r.headers()
        );
        assert_eq!(r.bytes().await.unwrap(), data, "{round}");
    }
}

/// The plain listener speaks HTTP/2 with prior knowledge (h2c) as well as
/// HTTP/1.1, and serves blobs over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_speaks_h2c() {
    let up = FakeUpstream::start("127.0.3.130:0").await;
    let m = Mirror::start(30, &up.url()).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let data = bytes_for("h2c", 100_000);
    let (d, _) = up.add_blob("library/app", &data);
    let r = h2.get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
}

/// Rule 5: a client that stops reading slows neither the download nor the
/// other clients of the same blob, and gets the whole blob once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_does_not_hold_up_the_download_or_others() {
    let up = FakeUpstream::start("127.0.3.131:0").await;
    let m = Mirror::start(31, &up.url()).await;
    let data = bytes_for("stalled-reader", 8_000_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.gate(&path);
    let target = format!("/v2/dockerhub/library/app/blobs/{d}");

    // The first client has a tiny receive buffer and stops reading after the
    // response head: a few KB fill it, and regmirror's sends to it block.
    let (mut stalled, head, mut got) = raw_get(&m, &target, Some(4096)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-length: {}", data.len())),
        "{head}"
    );

    // Another client attaches to the same download while upstream is
    // stalled half-way, then the rest comes.
    let other = client().get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    assert_eq!(other.status(), 200);
    up.open_gate();
    let body = tokio::time::timeout(Duration::from_secs(20), other.bytes())
        .await
        .expect("the other client's download is held up by the client that stopped reading")
        .expect("the other client's body");
    assert_eq!(body, data);
    assert!(m.stored(&d), "the download completed while one client was not reading");
    assert_eq!(up.count("GET", &path), 1);

    // The stall reached regmirror's send side: the connection's kernel
    // buffers (a few MB at most) did not take the whole blob, so regmirror
    // was left holding the rest while it completed the download.
    let (client_rx, server_tx) = socket_queues(&stalled);
    let left_regmirror = got.len() + client_rx + server_tx;
    assert!(
        left_regmirror < data.len(),
        "the stalled client's buffers took all {left_regmirror} bytes: it never stalled regmirror"
    );

    // Reading again, the stalled client gets the rest, intact.
    let mut rest = vec![0u8; data.len() - got.len()];
    tokio::time::timeout(Duration::from_secs(20), stalled.read_exact(&mut rest))
        .await
        .expect("the stalled client gets the rest once it reads again")
        .expect("the stalled client's body");
    got.extend_from_slice(&rest);
    assert!(got == data, "the stalled client got the wrong bytes");
}

/// Bytes queued in the kernel on a loopback TCP connection: unread at this
/// end (`conn`'s receive queue) and unacknowledged at the peer (the peer
/// socket's send queue), from /proc/net/tcp.
fn socket_queues(conn: &tokio::net::TcpStream) -> (usize, usize) {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        std::net::SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    let (local, peer) = (
        hex(conn.local_addr().expect("local addr")),
        hex(conn.peer_addr().expect("peer addr")),
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    // (tx_queue, rx_queue) of the socket `from` -> `to`
    let queues = |from: &str, to: &str| -> (usize, usize) {
        let fields = table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 4 && f[1] == from && f[2] == to)
            .unwrap_or_else(|| panic!("no socket {from} -> {to} in /proc/net/tcp"));
        let (tx, rx) = fields[4].split_once(':').expect("tx_queue:rx_queue");
        let n = |h: &str| usize::from_str_radix(h, 16).expect("hex queue size");
        (n(tx), n(rx))
    };
    (queues(&local, &peer).1, queues(&peer, &local).0)
}

// ---------------------------------------------------------------- hostile upstreams and clients

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Some registries serve manifest bytes on the blobs URL too. Fetched there
/// first, the bytes have no media type, and must never answer a manifest
/// request as if they were an image manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_bytes_first_fetched_as_a_blob_keep_their_media_type() {
    let up = FakeUpstream::start("127.0.3.132:0").await;
    let m = Mirror::start(32, &up.url()).await;
    let c = client();
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#).into_bytes();
    let d = up.add_manifest("library/multi", Some("1"), OCI_INDEX, &index);
    up.put(
        &format!("/v2/library/multi/blobs/{d}"),
        fake_upstream::Resource {
            body: index.clone().into(),
            content_type: "application/octet-stream".into(),
            digest: Some(d.clone()),
        },
    );
    let (_, body) = get_ok(&c, &m.url("multi", &format!("blobs/{d}"))).await;
    assert_eq!(body, index);
    assert!(m.stored(&d));
    for reference in [d.as_str(), "1"] {
        let r = c
            .get(m.url("multi", &format!("manifests/{reference}")))
            .header("accept", format!("{OCI_INDEX}, {OCI_MANIFEST}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{reference}");
        assert_eq!(header(&r, "content-type"), Some(OCI_INDEX), "{reference}");
        assert_eq!(r.bytes().await.unwrap(), index, "{reference}");
    }
    let fetched_as_manifest = up.count("GET", &format!("/v2/library/multi/manifests/{d}"));
    assert_eq!(fetched_as_manifest, 1, "the type is learnt once, then kept");
}

/// Single flight must not couple requesters: a request through a repository
/// that lacks the digest (a slow 404) does not fail a concurrent request
/// through one that has it, and nothing names the other repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_missing_in_one_repository_does_not_fail_another_that_has_it() {
    let up = FakeUpstream::start("127.0.3.133:0").await;
    let m = Mirror::start(33, &up.url()).await;
    let c = client();
    let data = bytes_for("only-in-has", 200_000);
    let (d, _) = up.add_blob("library/has", &data);
    up.delay(&format!("/v2/library/hasnt/blobs/{d}"), Duration::from_millis(800));
    let lacking = tokio::spawn({
        let (c, url) = (c.clone(), m.url("hasnt", &format!("blobs/{d}")));
        async move { c.get(url).send().await.unwrap() }
    });
    // Ask through the repository that has it while the 404 is on its way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = c.get(m.url("has", &format!("blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);
    let (status, body) = oci_error(lacking.await.unwrap()).await;
    assert_eq!(status, 404);
    assert!(body.contains("BLOB_UNKNOWN"), "{body}");
    assert!(!body.contains("library/has\""), "no other repository named: {body}");
}

/// tags/list passes on only validated pagination, in one canonical form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_forwards_only_validated_pagination() {
    let up = FakeUpstream::start("127.0.3.134:0").await;
    let m = Mirror::start(34, &up.url()).await;
    let c = client();
    up.put(
        "/v2/library/app/tags/list",
        fake_upstream::Resource {
            body: r#"{"name":"library/app","tags":["1","2"]}"#.into(),
            content_type: "application/json".into(),
            digest: None,
        },
    );
    let r = c
        .get(format!("{}?last=1&evil=%2e%2e&n=05", m.url("app", "tags/list")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let queries: Vec<Option<String>> = up
        .seen()
        .into_iter()
        .filter(|s| s.path == "/v2/library/app/tags/list")
        .map(|s| s.query)
        .collect();
    assert_eq!(queries, vec![Some("n=5&last=1".to_string())]);
    for (bad, code) in [("n=abc", "PAGINATION_NUMBER_INVALID"), ("last=..%2f", "TAG_INVALID")] {
        let r = c
            .get(format!("{}?{bad}", m.url("app", "tags/list")))
            .send()
            .await
            .unwrap();
        let (status, body) = oci_error(r).await;
        assert_eq!(status, 400, "{bad}");
        assert!(body.contains(code), "{bad}: {body}");
    }
    let listed = up.seen().iter().filter(|s| s.path.ends_with("/tags/list")).count();
    assert_eq!(listed, 1, "refused queries never reach upstream");
}

/// regmirror deletes inside its store, so it refuses to adopt a directory
/// that is not one, and leaves its contents alone.
#[tokio::test]
async fn a_cache_dir_that_is_not_a_store_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("somebodys");
    std::fs::create_dir_all(foreign.join("tmp")).unwrap();
    std::fs::write(foreign.join("tmp/precious"), b"keep me").unwrap();
    let toml = format!(
        r#"
[server]
http = "127.0.3.35:5000"
name = "regmirror.test"
[ca]
dir = '{root}/certs'
[cache]
dir = '{cache}'
max_size = "1GiB"
[[upstream]]
name = "docker.io"
hosts = ["docker.io"]
url = "http://127.0.3.235"
namespace = "dockerhub"
"#,
        root = dir.path().display(),
        cache = foreign.display()
    );
    let settings = regmirror::config::Settings::from_toml(&toml, "test").unwrap();
    let started = tokio::time::timeout(
        Duration::from_secs(10),
        regmirror::serve(settings, std::future::pending()),
    )
    .await
    .expect("start-up fails at once");
    let e = started.expect_err("a directory that is not a store is refused");
    assert!(e.to_string().contains("not a regmirror store"), "{e}");
    assert_eq!(std::fs::read(foreign.join("tmp/precious")).unwrap(), b"keep me");
}

// ---------------------------------------------------------------- redirects and auth (rules 8, 10, 11)

/// Rule 8: a redirect to a loopback or private address other than the
/// upstream's own is not followed, and fails cleanly; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_private_addresses_are_refused() {
    let up = FakeUpstream::start("127.0.3.136:0").await;
    let elsewhere = FakeUpstream::start("127.0.3.186:0").await;
    let m = Mirror::start(36, &up.url()).await;
    let c = client();
    let data = bytes_for("redirected-away", 10_000);
    let (d, path) = up.add_blob("library/app", &data);
    elsewhere.put(
        "/blob",
        Resource {
            body: data.clone().into(),
            content_type: "application/octet-stream".into(),
            digest: None,
        },
    );
    up.set_fault(&path, Fault::Redirect(format!("{}/blob", elsewhere.url())));
    let r = c.get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    let (status, code) = oci_error(r).await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
    assert!(elsewhere.seen().is_empty(), "the private address was dialled");
    assert!(!m.stored(&d));
}

/// Rule 8: a redirect target that answers 401 is an upstream error, never a
/// realm to send credentials to: its realm receives no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_target_that_challenges_gets_no_credentials() {
    let up = FakeUpstream::start("127.0.3.137:0").await;
    let cdn = FakeUpstream::start("127.0.3.187:0").await;
    let m = Mirror::start_with(37, &up.url(), r#"private_redirect_hosts = ["127.0.3.187"]"#).await;
    cdn.require_bearer(true);
    let data = bytes_for("challenged-cdn", 10_000);
    let (d, path) = up.add_blob("library/app", &data);
    up.set_fault(
        &path,
        Fault::Redirect(format!("{}/v2/library/app/blobs/{d}", cdn.url())),
    );
    let r = client().get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    let (status, code) = oci_error(r).await;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"));
    assert!(
        cdn.token_requests().is_empty(),
        "the redirect target's realm was asked for a token"
    );
    assert!(cdn.seen().iter().all(|s| s.authorization.is_none()));
    assert!(!m.stored(&d));
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A token upstream issues to the fake's user `alice` (password `pw`) for
/// `library/<repo>`, asked of regmirror's /token as a logged-in client would.
async fn alice_token(m: &Mirror, repo: &str) -> String {
    let url = format!("{}/token?scope=repository:dockerhub/library/{repo}:pull", m.base);
    token_of(
        client()
            .get(url)
            .header("authorization", basic("alice", "pw"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn token_of(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 200, "token request");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    v["token"].as_str().expect("a token").to_string()
}

/// Rule 10: regmirror's challenges point at its own /token, on the host the
/// client used; token requests with credentials are relayed to upstream's
/// realm with scopes in upstream's names (GET and the POST refresh grant),
/// and upstream's answer (a refusal included) comes back as it is. Without
/// credentials regmirror answers itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_are_relayed_with_scopes_rewritten() {
    let up = FakeUpstream::start("127.0.3.138:0").await;
    up.require_bearer(true);
    up.set_user("alice", "pw");
    let m = Mirror::start(38, &up.url()).await;
    let c = client();

    let r = c.get(format!("{}/v2/", m.base)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "www-authenticate"),
        Some(r#"Bearer realm="http://127.0.3.38:5000/token",service="fake-registry""#)
    );
    let r = c.get(m.url("app", "manifests/1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        header(&r, "www-authenticate").is_some_and(|w| w.contains(r#"scope="repository:dockerhub/library/app:pull""#)),
        "the scope is in the client's names: {:?}",
        header(&r, "www-authenticate")
    );

    // Several scopes, one request, with credentials: relayed, rewritten.
    let token = token_of(
        c.get(format!(
            "{}/token?service=anything&scope=repository:dockerhub/library/app:pull&scope=repository:dockerhub/library/other:pull&account=alice",
            m.base
        ))
        .header("authorization", basic("alice", "pw"))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert!(token.starts_with("tok-"), "upstream's own token: {token}");
    assert_eq!(
        up.token_requests().last().map(String::as_str),
        Some("repository:library/app:pull repository:library/other:pull")
    );
    assert_eq!(up.token_users().last(), Some(&Some("alice".to_string())));

    // A wrong password is upstream's 401, so `docker login` fails.
    let r = c
        .get(format!("{}/token?scope=repository:dockerhub/library/app:pull", m.base))
        .header("authorization", basic("alice", "wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The OAuth2 refresh-token grant, as containerd sends it.
    let before = up.token_requests().len();
    let token = token_of(
        c.post(format!("{}/token", m.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=refresh_token&refresh_token=good-refresh-token&service=x&client_id=containerd-client&scope=repository%3Adockerhub%2Flibrary%2Fapp%3Apull")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(token.starts_with("tok-"));
    assert_eq!(up.token_requests().len(), before + 1);
    assert_eq!(
        up.token_requests().last().map(String::as_str),
        Some("repository:library/app:pull")
    );

    // No credentials: regmirror's own token, upstream not asked.
    let before = up.token_requests().len();
    let token = token_of(
        c.get(format!("{}/token?scope=repository:dockerhub/library/app:pull", m.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(token.starts_with("regmirror-anonymous."), "{token}");
    assert_eq!(up.token_requests().len(), before);

    // An upstream that refuses every token request: its refusal, relayed.
    up.refuse_tokens(true);
    let r = c
        .get(format!("{}/token?scope=repository:dockerhub/library/app:pull", m.base))
        .header("authorization", basic("alice", "pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// An upstream that does not challenge gets no challenge, and credentials
/// sent to /token are not passed anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_auth_gets_no_challenge() {
    let up = FakeUpstream::start("127.0.3.139:0").await;
    let m = Mirror::start(39, &up.url()).await;
    let c = client();
    let r = c.get(format!("{}/v2/", m.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "www-authenticate").is_none());
    let token = token_of(
        c.get(format!("{}/token?scope=repository:dockerhub/library/app:pull", m.base))
            .header("authorization", basic("alice", "pw"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(token.starts_with("regmirror-anonymous."));
    assert!(up.token_requests().is_empty());
}

/// Rule 11: content cached for a client with its own token is served from
/// cache only to a client whose token upstream accepts for the repository
/// asked for (one HEAD per token and repository); anonymously, through a
/// public repository's name, or with a token for another repository it is
/// a 401 with a challenge. With upstream down, checked tokens still work
/// and nothing else private is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_content_is_served_only_to_clients_upstream_accepts() {
    let up = FakeUpstream::start("127.0.3.140:0").await;
    up.require_bearer(true);
    up.set_user("alice", "pw");
    up.private_prefix("library/private");
    let m = Mirror::start(40, &up.url()).await;
    let secret = bytes_for("private-layer", 50_000);
    let (d, path) = up.add_blob("library/private", &secret);
    up.add_blob("library/app", b"public layer");
    let url = m.url("private", &format!("blobs/{d}"));

    let token_for = |repo: &'static str| alice_token(&m, repo);
    let alice = client_with_auth(&format!("Bearer {}", token_for("private").await));
    let (_, body) = get_ok(&alice, &url).await;
    assert_eq!(body, secret);
    assert!(m.stored(&d));

    let anonymous = anonymous_client(&m).await;
    let other_repo = client_with_auth(&format!("Bearer {}", token_for("app").await));
    for (who, c, url) in [
        ("no token at all", client(), url.clone()),
        ("anonymous token", anonymous.clone(), url.clone()),
        (
            "anonymous, through a public repository",
            anonymous.clone(),
            m.url("app", &format!("blobs/{d}")),
        ),
        ("a token for another repository", other_repo.clone(), url.clone()),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
            let r = c.request(method.clone(), &url).send().await.unwrap();
            assert_eq!(r.status(), 401, "{who} {method}");
            assert!(
                header(&r, "www-authenticate")
                    .is_some_and(|w| w.starts_with("Bearer realm=\"http://127.0.3.40:5000/token\"")),
                "{who}: {:?}",
                header(&r, "www-authenticate")
            );
            let body = r.bytes().await.unwrap();
            assert!(
                !String::from_utf8_lossy(&body).contains(&d[7..]),
                "{who}: no hint of the digest"
            );
            assert!(
                !body.windows(secret.len().min(64)).any(|w| w == &secret[..64]),
                "{who}: bytes leaked"
            );
        }
    }

    // The right token again: served from cache, no second check.
    let heads_before = up.count("HEAD", &path);
    for _ in 0..3 {
        assert_eq!(get_ok(&alice, &url).await.1, secret);
    }
    assert_eq!(
        up.count("HEAD", &path),
        heads_before,
        "one check per (token, repository)"
    );
    assert_eq!(up.count("GET", &path), 1, "fetched once");

    // Upstream gone: the checked token still reads; a fresh one does not.
    let fresh = client_with_auth(&format!("Bearer {}", token_for("private").await));
    drop(up);
    assert_eq!(get_ok(&alice, &url).await.1, secret);
    let r = fresh.get(&url).send().await.unwrap();
    assert_ne!(r.status(), 200, "an unchecked token is not served private content");
}

/// Client setup in one command: `/ca.crt` serves the root certificate, the
/// same bytes as `ca.pem`; nothing serves the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_certificate_is_served_and_its_key_never_is() {
    let up = FakeUpstream::start("127.0.3.141:0").await;
    let m = Mirror::start(41, &up.url()).await;
    let c = client();
    let r = c.get(format!("{}/ca.crt", m.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let served = r.bytes().await.unwrap();
    let on_disk = std::fs::read(m.dir.path().join("certs/ca.pem")).unwrap();
    assert_eq!(served, on_disk);
    let key = std::fs::read_to_string(m.dir.path().join("certs/ca.key")).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for path in [
        "/ca.key",
        "/certs/ca.key",
        "/ca.crt/../ca.key",
        "/v2/../ca.key",
        "/ca.pem",
    ] {
        let r = c.get(format!("{}{path}", m.base)).send().await.unwrap();
        let body = r.bytes().await.unwrap();
        assert!(
            !String::from_utf8_lossy(&body).contains(&key_body[..32]),
            "{path} served the key"
        );
    }
}

/// Rule 11 and single flight: a token checked for one repository does not
/// join a download of another repository's private content in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_repository_cannot_join_a_private_download() {
    let up = FakeUpstream::start("127.0.3.142:0").await;
    up.require_bearer(true);
    up.set_user("alice", "pw");
    up.private_prefix("library/private");
    let m = Mirror::start(42, &up.url()).await;
    let secret = bytes_for("in-flight-private", 400_000);
    let (d, path) = up.add_blob("library/private", &secret);
    let (public_d, _) = up.add_blob("library/app", b"a public layer");
    up.gate(&path);
    let token_for = |repo: &'static str| alice_token(&m, repo);
    let private = client_with_auth(&format!("Bearer {}", token_for("private").await));
    let app_only = client_with_auth(&format!("Bearer {}", token_for("app").await));
    // The app-only token is checked for library/app.
    assert_eq!(
        get_ok(&app_only, &m.url("app", &format!("blobs/{public_d}"))).await.1,
        b"a public layer"
    );

    let leader = tokio::spawn({
        let url = m.url("private", &format!("blobs/{d}"));
        async move { private.get(url).send().await.unwrap().bytes().await.map(|b| b.to_vec()) }
    });
    tokio::time::timeout(Duration::from_secs(10), async {
        while up.count("GET", &path) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the private download starts");
    let r = app_only.get(m.url("app", &format!("blobs/{d}"))).send().await.unwrap();
    assert_ne!(r.status(), 200, "joined another repository's private download");
    let body = r.bytes().await.unwrap();
    assert!(body.len() < 1000, "no content bytes reached the other token");
    up.open_gate();
    assert_eq!(leader.await.unwrap().unwrap(), secret);
}

/// `/healthz` says the process is up; `/readyz` also that the store takes
/// writes (the CA and listeners are up if it answers at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_whether_the_store_can_be_written() {
    let up = FakeUpstream::start("127.0.3.143:0").await;
    let m = Mirror::start(43, &up.url()).await;
    let c = client();
    let get = |path: &str| {
        let (c, url) = (c.clone(), format!("{}{path}", m.base));
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!((get("/healthz").await, get("/readyz").await), (200, 200));
    // Root ignores permissions: make the download directory unusable instead.
    let tmp = m.dir.path().join("data/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    assert_eq!((get("/healthz").await, get("/readyz").await), (200, 503));
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    assert_eq!(get("/readyz").await, 200);
}

/// `[access] allow`: a client outside the allowed networks is refused at
/// the connection, before any request is read; one inside is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_access_allow_are_refused_at_the_connection() {
    let up = FakeUpstream::start("127.0.3.144:0").await;
    let inside = Mirror::start_with(44, &up.url(), "[access]\nallow = [\"127.0.0.1/32\", \"10.0.0.0/8\"]").await;
    assert_eq!(
        client()
            .get(format!("{}/v2/", inside.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Mirror::start waits for an answer, which this one never gives: start it by hand.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[server]
http = "127.0.3.45:5000"
name = "regmirror.test"
[ca]
dir = '{d}/certs'
[cache]
dir = '{d}/data'
max_size = "1GiB"
[[upstream]]
name = "docker.io"
hosts = ["docker.io"]
url = "{url}"
namespace = "dockerhub"
[access]
allow = ["10.0.0.0/8"]
"#,
        d = dir.path().display(),
        url = up.url()
    );
    let settings = regmirror::config::Settings::from_toml(&toml, "test").unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(regmirror::serve(settings, async move {
        let _ = rx.await;
    }));
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio::net::TcpStream::connect("127.0.3.45:5000").await {
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(mut s) => {
                    let _ = s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf).await;
                    return buf;
                }
            }
        }
    })
    .await
    .expect("the listener comes up");
    assert!(
        refused.is_empty(),
        "a refused client got an answer: {}",
        String::from_utf8_lossy(&refused)
    );
    assert!(
        up.seen().iter().all(|s| s.path == "/v2/"),
        "nothing of it reached upstream"
    );
    let _ = tx.send(());
    task.abort();
}

/// Listings leak nothing: a private repository cached for one client is
/// not in anyone else's catalog, and its tag list needs the client's own
/// token (upstream is asked with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_only_what_the_client_may_read() {
    let up = FakeUpstream::start("127.0.3.146:0").await;
    up.require_bearer(true);
    up.set_user("alice", "pw");
    up.private_prefix("library/private");
    let m = Mirror::start(46, &up.url()).await;
    let manifest = manifest_bytes("listing");
    up.add_manifest("library/private", Some("1"), OCI_MANIFEST, &manifest);
    up.add_manifest("library/app", Some("1"), OCI_MANIFEST, &manifest);
    for repo in ["private", "app"] {
        up.put(
            &format!("/v2/library/{repo}/tags/list"),
            Resource {
                body: format!(r#"{{"name":"library/{repo}","tags":["1"]}}"#).into(),
                content_type: "application/json".into(),
                digest: None,
            },
        );
    }
    let token = token_of(
        client()
            .get(format!(
                "{}/token?scope=repository:dockerhub/library/private:pull",
                m.base
            ))
            .header("authorization", basic("alice", "pw"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let alice = client_with_auth(&format!("Bearer {token}"));
    let anonymous = anonymous_client(&m).await;
    for (c, repo) in [(&alice, "private"), (&anonymous, "app")] {
        let r = c
            .get(m.url(repo, "manifests/1"))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{repo}");
    }
    let catalog = |c: reqwest::Client| {
        let url = format!("{}/v2/_catalog", m.base);
        async move {
            let body = c.get(url).send().await.unwrap().bytes().await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["repositories"].clone()
        }
    };
    assert_eq!(
        catalog(anonymous.clone()).await,
        serde_json::json!(["dockerhub/library/app"])
    );
    assert_eq!(
        catalog(alice.clone()).await,
        serde_json::json!(["dockerhub/library/app", "dockerhub/library/private"])
    );
    let r = anonymous.get(m.url("private", "tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 401, "the private tag list needs the client's own token");
    let r = alice.get(m.url("private", "tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// share_private = true: what regmirror's own credentials can read is
/// served to every client of the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_private_serves_what_the_proxy_credentials_can_read() {
    let up = FakeUpstream::start("127.0.3.147:0").await;
    up.require_bearer(true);
    up.set_user("proxy", "pw");
    up.private_prefix("library/private");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    let keys = |share: bool| {
        format!(
            "username = \"proxy\"\npassword_file = '{}'\nshare_private = {share}",
            pw.display()
        )
    };
    let secret = bytes_for("shared-private", 20_000);
    let (d, _) = up.add_blob("library/private", &secret);
    let not_shared = Mirror::start_with(47, &up.url(), &keys(false)).await;
    let r = anonymous_client(&not_shared)
        .await
        .get(not_shared.url("private", &format!("blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "proxy credentials alone share nothing private");
    let shared = Mirror::start_with(48, &up.url(), &keys(true)).await;
    let (_, body) = get_ok(
        &anonymous_client(&shared).await,
        &shared.url("private", &format!("blobs/{d}")),
    )
    .await;
    assert_eq!(body, secret);
    assert!(up.token_users().iter().any(|u| u.as_deref() == Some("proxy")));
}

/// `repositories = [...]`: only those may be pulled through the proxy, by
/// tag and by digest alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_repositories_are_served() {
    let up = FakeUpstream::start("127.0.3.149:0").await;
    let m = Mirror::start_with(49, &up.url(), r#"repositories = ["library/app", "myorg/**"]"#).await;
    let c = client();
    let manifest = manifest_bytes("allowed");
    let d = up.add_manifest("library/app", Some("1"), OCI_MANIFEST, &manifest);
    up.add_manifest("library/other", Some("1"), OCI_MANIFEST, &manifest);
    let layer = bytes_for("allowed-layer", 1000);
    let (ld, _) = up.add_blob("library/app", &layer);
    up.add_blob("library/other", &layer);
    assert_eq!(get_ok(&c, &m.url("app", "manifests/1")).await.1, manifest);
    assert_eq!(get_ok(&c, &m.url("app", &format!("blobs/{ld}"))).await.1, layer);
    for path in [
        "manifests/1".to_string(),
        format!("manifests/{d}"),
        format!("blobs/{ld}"),
    ] {
        let r = c.get(m.url("other", &path)).send().await.unwrap();
        let (status, code) = oci_error(r).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "DENIED"),
            "library/other/{path}, though cached"
        );
    }
    assert!(
        up.seen().iter().all(|s| !s.path.contains("library/other")),
        "nothing asked upstream for it"
    );
}
