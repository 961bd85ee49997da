//! `[[warm]]` against a real upstream (distribution's access log): a
//! schedule fetches an image with no client at all (only the platform it
//! names), a later skopeo pull costs upstream no blob GET, and runs that
//! fail (image not pushed yet, upstream down) are logged, counted, shown on
//! the status page and tried again, while serving goes on.

mod common;

use std::time::Duration;

use common::images::Format;
use common::matrix::{assert_pulled, assert_warm, Stack};
use common::UpstreamEnvOpts;

const REPO: &str = "org/warm-multi";

fn runs(s: &Stack, result: &str) -> u64 {
    let label = format!("regmirror_warm_runs_total{{result=\"{result}\"}} ");
    s.rm.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&label))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

fn status_page(s: &Stack) -> String {
    common::block_on(async {
        reqwest::get(format!("{}/", s.rm.http_url()))
            .await
            .expect("status page")
            .text()
            .await
            .expect("status page body")
    })
}

#[track_caller]
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    assert!(
        common::wait_until(Duration::from_secs(20), &mut done),
        "{what} within 20 s"
    );
}

#[test]
fn a_schedule_warms_the_named_platform_without_a_client_and_retries_failed_runs() {
    let mut s = Stack::start_with(UpstreamEnvOpts::default(), |mut cfg| {
        cfg.extra_toml +=
            &format!("[[warm]]\nimages = [\"quay.io/{REPO}:1\"]\nplatforms = [\"linux/arm64\"]\nevery = \"2s\"\n");
        cfg
    });

    // The first run (at start) finds no image: logged, counted, shown.
    wait_for("a failed run", || runs(&s, "failed") >= 1);
    assert!(
        s.rm.log().contains("scheduled warm failed"),
        "the failed run is logged:\n{}",
        s.rm.log()
    );
    assert!(
        status_page(&s).contains("failed</span>"),
        "the status page shows the failure"
    );

    // Pushed now: a later run fetches arm64 and nothing of amd64.
    let mark = s.up().mark();
    let idx = s.index(REPO, Format::Oci);
    let ok_before = runs(&s, "ok");
    wait_for("a successful run", || runs(&s, "ok") > ok_before);
    let (arm, amd) = (idx.platform("arm64"), idx.platform("amd64"));
    // (The push's own blob HEADs are in the log too: count GETs.)
    let fetched = s.up().blob_fetches_since(mark);
    for d in arm.blob_digests() {
        assert_eq!(fetched.get(&d), Some(&1), "arm64 blob {d} fetched once: {fetched:?}");
    }
    for d in amd.blob_digests() {
        assert!(!fetched.contains_key(&d), "amd64 blob {d} was fetched: {fetched:?}");
    }
    assert!(
        !s.up().manifest_gets_since(mark).contains(&amd.manifest_digest),
        "the amd64 manifest was fetched"
    );
    let page = status_page(&s);
    assert!(
        page.contains(&format!("quay.io/{REPO}:1")) && page.contains("ok</span>: 3 blobs"),
        "the status page shows the run:\n{page}"
    );
    assert!(
        s.rm.log().contains("listener=warm") || s.rm.log().contains("\"listener\":\"warm\""),
        "warm requests are logged with their listener"
    );

    // A client's pull is warm: no blob or manifest content from upstream.
    let mark = s.up().mark();
    let name = format!("quay.io/{REPO}:1");
    let client = s.client();
    assert_pulled(
        "after the warm",
        &client.skopeo_copy(&name, Some("arm64")),
        &arm.manifest_digest,
    );
    assert_warm(s.up(), mark, REPO, "after the warm");

    // Upstream down: runs fail and are tried again; pulls are still served.
    s.env.upstream.stop();
    let failed_before = runs(&s, "failed");
    wait_for("a failed run with upstream down", || runs(&s, "failed") > failed_before);
    wait_for("another failed run", || runs(&s, "failed") > failed_before + 1);
    assert_pulled(
        "upstream down",
        &client.skopeo_copy(&name, Some("arm64")),
        &arm.manifest_digest,
    );
}
