//! Operating regmirror: what `/metrics`, the request log and the status
//! page say after real pulls (skopeo, transparent mode, distribution
//! upstream), checked against what those pulls imply; and what they say of
//! an upstream that rate-limits and fails (the in-process fake upstream).

mod common;
mod fake_upstream;
mod standalone;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use common::images::{Format, Image};
use common::matrix::{assert_pulled, Stack};
use common::UpstreamEnvOpts;

/// `/metrics`, parsed: `name{labels}` → value.
fn metrics(s: &Stack) -> (String, HashMap<String, f64>) {
    let url = format!("{}/metrics", s.rm.http_url());
    let (content_type, body) = common::block_on(async {
        let r = reqwest::get(&url).await.expect("GET /metrics");
        assert_eq!(r.status(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        (ct, r.text().await.expect("metrics body"))
    });
    let mut values = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (key, value) = line.rsplit_once(' ').expect("sample line");
        values.insert(key.to_string(), value.parse::<f64>().expect("sample value"));
    }
    (content_type, values)
}

/// A sample's value; a sample that is absent counts as 0 (a labelled
/// counter appears only once it was touched).
fn val(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// Bytes a pull of `img` transfers: manifest, config and layers.
fn image_bytes(img: &Image) -> f64 {
    (img.manifest.len() + img.config.data.len() + img.layers.iter().map(|l| l.data.len()).sum::<usize>()) as f64
}

fn stack_with_json_logs() -> Stack {
    Stack::start_with(UpstreamEnvOpts::default(), |mut c| {
        c.log_json = true;
        c
    })
}

/// The JSON "request" lines of regmirror's log.
fn request_lines(s: &Stack) -> Vec<serde_json::Value> {
    s.rm.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect()
}

#[test]
fn metrics_and_request_log_tell_what_two_pulls_did() {
    let s = stack_with_json_logs();
    let img = s.image("library/ops-metrics", Format::Oci);
    let name = "docker.io/library/ops-metrics:1";
    let total = image_bytes(&img);
    let up = "upstream=\"docker.io\"";

    // Cold: the manifest and three blobs are misses, every byte came from upstream.
    assert_pulled(name, &s.client().skopeo_copy(name, None), &img.manifest_digest);
    let (content_type, m) = metrics(&s);
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    assert_eq!(val(&m, &format!("regmirror_cache_misses_total{{{up}}}")), 4.0, "{m:?}");
    assert_eq!(val(&m, &format!("regmirror_cache_hits_total{{{up}}}")), 0.0);
    assert_eq!(val(&m, &format!("regmirror_cache_joins_total{{{up}}}")), 0.0);
    assert_eq!(
        val(&m, &format!("regmirror_served_bytes_total{{{up},source=\"upstream\"}}")),
        total
    );
    assert_eq!(
        val(&m, &format!("regmirror_served_bytes_total{{{up},source=\"cache\"}}")),
        0.0
    );
    assert_eq!(
        val(&m, &format!("regmirror_upstream_fetched_bytes_total{{{up}}}")),
        total
    );
    assert_eq!(val(&m, "regmirror_downloads_in_flight"), 0.0);
    assert_eq!(val(&m, "regmirror_download_waiters"), 0.0);
    let upstream_200 = val(&m, &format!("regmirror_upstream_requests_total{{{up},status=\"200\"}}"));
    // The tag HEAD, the manifest GET, and per blob the HEAD that checks
    // this client may read it and the GET.
    assert_eq!(upstream_200, 8.0, "{m:?}");

    // Warm: the same four from the store, nothing more fetched, one more
    // tag HEAD (the content is now known to be public: no blob HEADs),
    // asked conditionally and confirmed by upstream with a 304.
    assert_pulled(name, &s.client().skopeo_copy(name, None), &img.manifest_digest);
    let (_, m) = metrics(&s);
    assert_eq!(val(&m, &format!("regmirror_cache_hits_total{{{up}}}")), 4.0, "{m:?}");
    assert_eq!(val(&m, &format!("regmirror_cache_misses_total{{{up}}}")), 4.0);
    assert_eq!(
        val(&m, &format!("regmirror_served_bytes_total{{{up},source=\"cache\"}}")),
        total
    );
    assert_eq!(
        val(&m, &format!("regmirror_upstream_fetched_bytes_total{{{up}}}")),
        total
    );
    assert_eq!(
        val(&m, &format!("regmirror_upstream_requests_total{{{up},status=\"200\"}}")),
        upstream_200
    );
    assert_eq!(
        val(&m, &format!("regmirror_upstream_requests_total{{{up},status=\"304\"}}")),
        1.0,
        "{m:?}"
    );
    assert_eq!(
        val(
            &m,
            &format!("regmirror_requests_total{{{up},kind=\"blob\",status=\"2xx\"}}")
        ),
        6.0
    );
    assert_eq!(
        val(
            &m,
            &format!("regmirror_requests_total{{{up},kind=\"tag\",status=\"2xx\"}}")
        ),
        2.0
    );
    // Each skopeo run pings, is challenged, and gets an anonymous token
    // from regmirror itself (no upstream token request for it).
    assert_eq!(
        val(
            &m,
            &format!("regmirror_requests_total{{{up},kind=\"ping\",status=\"4xx\"}}")
        ),
        2.0
    );
    assert_eq!(val(&m, &format!("regmirror_tokens_issued_total{{{up}}}")), 2.0, "{m:?}");
    assert_eq!(
        val(
            &m,
            &format!("regmirror_requests_total{{{up},kind=\"token\",status=\"2xx\"}}")
        ),
        2.0,
        "token requests are counted under the upstream their scope names"
    );
    assert_eq!(val(&m, &format!("regmirror_tokens_relayed_total{{{up}}}")), 0.0);
    assert_eq!(val(&m, "regmirror_request_duration_seconds_count{kind=\"blob\"}"), 6.0);
    assert_eq!(val(&m, "regmirror_request_duration_seconds_count{kind=\"tag\"}"), 2.0);
    assert!(val(&m, "regmirror_cache_bytes") >= 0.0);

    // One JSON line per request, with what the handler knew.
    let lines = request_lines(&s);
    let layer = &img.layers[0];
    let for_layer: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["kind"] == "blob" && l["reference"] == layer.digest.as_str())
        .collect();
    assert_eq!(for_layer.len(), 2, "two GETs of the layer logged:\n{lines:#?}");
    for (line, outcome) in for_layer.iter().zip(["miss", "hit"]) {
        assert_eq!(line["method"], "GET", "{line}");
        assert_eq!(line["upstream"], "docker.io", "{line}");
        assert_eq!(line["repo"], "library/ops-metrics", "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["bytes"], layer.data.len() as u64, "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
    }
    let tags: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "tag").collect();
    assert!(
        tags.iter().any(|l| l["reference"] == "1" && l["outcome"] == "hit"),
        "{tags:#?}"
    );
}

/// Where artifacts of the test run go (`target/artifacts`).
fn artifacts_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("artifacts");
    std::fs::create_dir_all(&dir).expect("create target/artifacts");
    dir
}

/// Runs headless Chromium on `url` with `args`; its stdout.
fn chromium(profile: &std::path::Path, url: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("60")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium (scripts/test.sh installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_shows_a_pulled_image_in_a_browser() {
    let s = Stack::start();
    let img = s.image("org/ops-page", Format::Docker);
    let name = "ghcr.io/org/ops-page:1";
    assert_pulled(name, &s.client().skopeo_copy(name, None), &img.manifest_digest);
    assert_pulled(name, &s.client().skopeo_copy(name, None), &img.manifest_digest);

    let url = format!("{}/", s.rm.http_url());
    let profile = common::tempdir("chromium-");
    let dom = chromium(profile.path(), &url, &["--dump-dom"]);
    let cached_row = "<td class=\"repo\">org/ops-page</td><td class=\"tag\">1</td>";
    assert!(dom.contains(cached_row), "no cached row for org/ops-page:1 in\n{dom}");
    assert!(dom.contains("ghcr.io/org/ops-page"), "no recent pull in\n{dom}");
    // The second pull was served from cache: half of four lookups were hits.
    assert!(dom.contains("<b id=\"hit-ratio\">50 %</b>"), "{dom}");
    assert!(!dom.contains("<b id=\"bytes-saved\">0 B</b>"), "{dom}");

    let png = artifacts_dir().join("status-page.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        profile.path(),
        &url,
        &[&format!("--screenshot={}", png.display()), "--window-size=412,915"],
    );
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "a {}-byte screenshot shows nothing", bytes.len());
}

#[test]
fn the_status_page_is_not_served_on_intercepted_names() {
    let s = Stack::start();
    let client = common::http_client_resolving(
        &std::fs::read(&s.rm.ca_pem).expect("ca.pem"),
        &[("ghcr.io", s.rm.config.https)],
    );
    let status = common::block_on(async {
        client
            .get("https://ghcr.io/")
            .send()
            .await
            .expect("GET https://ghcr.io/")
            .status()
    });
    assert_eq!(status, 404);
}

/// GETs `url` from the plain listener: (status, body).
async fn get_text(url: &str, accept: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// A sample's value from a `/metrics` text.
fn sample(metrics: &str, key: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn upstream_health_rate_limit_and_failures_show_in_metrics_and_on_the_page() {
    common::init_crypto();
    let up = fake_upstream::FakeUpstream::start("127.0.10.3:0").await;
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    up.add_manifest(
        "library/rl",
        Some("1"),
        media_type,
        br#"{"schemaVersion":2,"layers":[]}"#,
    );
    up.always_header("ratelimit-remaining", "77;w=21600");

    let dir = tempfile::tempdir().unwrap();
    let http = "127.0.10.4:5000";
    let cfg = standalone::write_config(dir.path(), http, &["registry-1.docker.io"]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("http://127.0.0.9", &up.url())).unwrap();
    let _regmirror = standalone::spawn(&cfg, &[], std::process::Stdio::null());
    standalone::wait_listening(http);
    let tag = format!("http://{http}/v2/dockerhub/library/rl/manifests/1");
    let metrics_url = format!("http://{http}/metrics");
    let up_label = "{upstream=\"docker.io\"}";

    assert_eq!(get_text(&tag, Some(media_type)).await.0, 200);
    let (_, m) = get_text(&metrics_url, None).await;
    assert_eq!(
        sample(&m, &format!("regmirror_upstream_ratelimit_remaining{up_label}")),
        Some(77.0),
        "{m}"
    );

    // Upstream fails: the tag is served stale, and the failure is recorded.
    let tag_path = "/v2/library/rl/manifests/1";
    up.set_fault(tag_path, fake_upstream::Fault::Status(503));
    assert_eq!(get_text(&tag, Some(media_type)).await.0, 200);
    up.always_header("ratelimit-remaining", "0;w=21600");
    up.set_fault(tag_path, fake_upstream::Fault::TooMany { retry_after: 1 });
    assert_eq!(get_text(&tag, Some(media_type)).await.0, 200);

    let (_, m) = get_text(&metrics_url, None).await;
    let count = |key: &str| sample(&m, key).unwrap_or(0.0);
    assert_eq!(count(&format!("regmirror_stale_served_total{up_label}")), 2.0, "{m}");
    assert_eq!(
        count(&format!("regmirror_upstream_rate_limited_total{up_label}")),
        1.0,
        "{m}"
    );
    // The 503 was asked again `retries` (default 2) times before the tag
    // was served stale; the 429's Retry-After ended its request at once.
    assert_eq!(
        count("regmirror_upstream_requests_total{upstream=\"docker.io\",status=\"503\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(
        count(&format!("regmirror_upstream_ratelimit_remaining{up_label}")),
        0.0,
        "{m}"
    );
    // Every metric exposed is named in the README's metrics table.
    let readme = include_str!("../README.md");
    let names: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    assert!(names.len() >= 15, "{m}");
    for name in names {
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is not in the README's metrics table"
        );
    }

    let (status, page) = get_text(&format!("http://{http}/"), None).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("answered 429 Too Many Requests"),
        "no last error on the page:\n{page}"
    );
    assert!(
        page.contains("<td class=\"n\">0</td></tr>"),
        "no rate limit left on the page:\n{page}"
    );
    assert!(
        page.contains("<td class=\"repo\">library/rl</td><td class=\"tag\">1</td>"),
        "{page}"
    );
    let recent: Vec<&str> = page.matches("docker.io/library/rl").collect();
    assert!(recent.len() >= 3, "three pulls of library/rl:1 listed:\n{page}");
    assert!(page.contains("<td>stale</td>"), "{page}");
}
