//! Tag policies against a real upstream (distribution, its access log the
//! count of what reached it), pulled by skopeo through transparent mode:
//! `tag_check_interval` answers a confirmed tag from the store, immutable
//! tags are asked once, excluded and unmatched ones every time, a moved tag
//! is seen after the interval, `Cache-Control: no-cache` forces a check, and
//! a private answer is never served unasked to an anonymous client.

mod common;

use std::time::{Duration, Instant};

use common::images::{build_image, Format};
use common::matrix::{assert_pulled, Stack};
use common::token_server::TokenPolicy;
use common::upstream::Upstream;
use common::UpstreamEnvOpts;

const KIB: usize = 1024;
const PRIVATE: &str = "org/tp-private";
const MOVING_INTERVAL: Duration = Duration::from_secs(6);

/// quay.io: confirmed tags hold 30 s; `org/tp-release` has release tags
/// immutable (but `0.x`) and a 1 s interval; `org/tp-moving` 6 s.
const POLICY: &str = r#"tag_check_interval = "30s"

[[upstream.tag_policy]]
repositories = ["org/tp-release"]
tag_check_interval = "1s"
immutable_tags = ['^v?\d+(\.\d+){1,2}$']
immutable_tags_exclude = ['^0\.']

[[upstream.tag_policy]]
repositories = ["org/tp-moving"]
tag_check_interval = "6s"
"#;

fn stack() -> Stack {
    let opts = UpstreamEnvOpts {
        policy: TokenPolicy {
            private_prefixes: vec![PRIVATE.into()],
            ..Default::default()
        },
        ..Default::default()
    };
    Stack::start_with(opts, |mut cfg| {
        let quay = cfg
            .upstreams
            .iter_mut()
            .find(|u| u.name == "quay.io")
            .expect("quay.io upstream");
        quay.extra = POLICY.into();
        cfg
    })
}

/// Requests upstream answered (not 401 challenges) for `repo:tag` since `mark`.
fn tag_asks(up: &Upstream, mark: usize, repo: &str, tag: &str) -> usize {
    up.entries_since(mark)
        .iter()
        .filter(|e| e.repo() == Some(repo) && e.manifest_ref() == Some(tag) && e.status != 401)
        .count()
}

fn skipped(s: &Stack, reason: &str) -> u64 {
    let metrics = s.rm.metrics();
    let label = format!("regmirror_tag_checks_skipped_total{{upstream=\"quay.io\",reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&label))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

#[test]
fn ten_pulls_of_a_tag_within_the_interval_ask_upstream_once_and_no_cache_forces_a_check() {
    let s = stack();
    let repo = "org/tp-interval";
    let img = s.image(repo, Format::Oci);
    let name = format!("quay.io/{repo}:1");
    let mark = s.up().mark();
    for i in 0..10 {
        assert_pulled(
            &format!("pull {i}"),
            &s.client().skopeo_copy(&name, None),
            &img.manifest_digest,
        );
    }
    assert_eq!(
        tag_asks(s.up(), mark, repo, "1"),
        1,
        "ten pulls within tag_check_interval: one tag request upstream"
    );
    assert_eq!(skipped(&s, "interval"), 9);

    // A client that says `Cache-Control: no-cache` is answered by upstream.
    let mark = s.up().mark();
    let digest = common::block_on(async {
        let c = reqwest::Client::new();
        let url = format!("{}/v2/quay/{repo}/manifests/1", s.rm.http_url());
        let accept = "application/vnd.oci.image.manifest.v1+json";
        let challenged = c.get(&url).header("accept", accept).send().await.expect("GET");
        assert_eq!(challenged.status(), 401);
        let token = common::anonymous_token(&c, &challenged).await;
        let r = c
            .get(&url)
            .header("accept", accept)
            .header("cache-control", "no-cache")
            .bearer_auth(token)
            .send()
            .await
            .expect("GET with no-cache");
        assert_eq!(r.status(), 200);
        r.headers()["docker-content-digest"].to_str().unwrap().to_string()
    });
    assert_eq!(digest, img.manifest_digest);
    assert_eq!(
        tag_asks(s.up(), mark, repo, "1"),
        1,
        "Cache-Control: no-cache asks upstream"
    );
    assert_eq!(skipped(&s, "interval"), 9);
}

#[test]
fn immutable_tags_are_asked_once_and_excluded_and_other_tags_every_time() {
    let s = stack();
    let repo = "org/tp-release";
    let img = build_image(Format::Docker, "amd64", &[64 * KIB]);
    for tag in ["1.2.3", "0.9", "latest"] {
        s.env.pusher.push_image(repo, tag, &img);
    }
    let mark = s.up().mark();
    for round in 0..3 {
        if round > 0 {
            // Past this repository's 1 s interval.
            std::thread::sleep(Duration::from_millis(1300));
        }
        for tag in ["1.2.3", "0.9", "latest"] {
            let name = format!("quay.io/{repo}:{tag}");
            assert_pulled(
                &format!("round {round}: {name}"),
                &s.client().skopeo_copy(&name, None),
                &img.manifest_digest,
            );
        }
    }
    let asks = |tag| tag_asks(s.up(), mark, repo, tag);
    assert_eq!(asks("1.2.3"), 1, "an immutable tag is asked once");
    assert_eq!(asks("0.9"), 3, "an excluded tag is asked once the interval is over");
    assert_eq!(
        asks("latest"),
        3,
        "a tag no pattern matches is asked once the interval is over"
    );
    assert_eq!(skipped(&s, "immutable"), 2);
}

#[test]
fn a_moved_tag_is_served_as_it_was_until_the_interval_is_over() {
    let s = stack();
    let repo = "org/tp-moving";
    let name = format!("quay.io/{repo}:1");
    let first = s.image(repo, Format::Oci);
    assert_pulled("first", &s.client().skopeo_copy(&name, None), &first.manifest_digest);
    let confirmed = Instant::now();

    let moved = s.image(repo, Format::Oci);
    let mark = s.up().mark();
    assert_pulled(
        "within the interval",
        &s.client().skopeo_copy(&name, None),
        &first.manifest_digest,
    );
    assert!(
        confirmed.elapsed() < MOVING_INTERVAL,
        "the pull within the interval took until {:?} after the confirmation: too slow to tell",
        confirmed.elapsed()
    );
    assert_eq!(
        tag_asks(s.up(), mark, repo, "1"),
        0,
        "within the interval upstream is not asked"
    );

    std::thread::sleep(MOVING_INTERVAL.saturating_sub(confirmed.elapsed()) + Duration::from_millis(300));
    let mark = s.up().mark();
    assert_pulled(
        "after the interval",
        &s.client().skopeo_copy(&name, None),
        &moved.manifest_digest,
    );
    assert_eq!(tag_asks(s.up(), mark, repo, "1"), 1);
}

#[test]
fn a_private_answer_is_not_served_unasked_to_an_anonymous_client() {
    let s = stack();
    let img = s.image(PRIVATE, Format::Oci);
    let name = format!("quay.io/{PRIVATE}:1");
    let creds = "pusher:s3cret-pw";
    assert_pulled(
        "with credentials",
        &s.client().skopeo_copy_opts(&name, None, &["--src-creds", creds]),
        &img.manifest_digest,
    );
    // Within the 30 s interval, with the answer and its content stored.
    let mark = s.up().mark();
    let (out, _) = s.client().skopeo_copy(&name, None);
    assert!(
        !out.success(),
        "an anonymous pull of a private tag succeeded:\n{}",
        out.stderr
    );
    let all = format!("{}\n{}", out.stdout, out.stderr).to_lowercase();
    assert!(
        ["unauthorized", "authentication required"]
            .iter()
            .any(|w| all.contains(w)),
        "expected an authorization error:\n{all}"
    );
    assert!(
        s.up().entries_since(mark).iter().any(|e| e.manifest_ref() == Some("1")),
        "the anonymous request for the tag was asked upstream"
    );
    assert_eq!(skipped(&s, "interval"), 0);
}
