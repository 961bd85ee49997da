//! Failover between real upstreams and egress through a real forward proxy:
//! two Debian `docker-registry` instances holding the same images behind one
//! upstream with two `urls`, and Debian's `tinyproxy` as the `HTTPS_PROXY`.
//!
//! Addresses: 127.0.11.20–39 (regmirror, registries, proxy), distinct from
//! the in-process tests of tests/failover.rs.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::certs::TestCa;
use common::daemons::Tinyproxy;
use common::images::{self, Format, Image, Pusher};
use common::regmirror::{Config, Regmirror, UpstreamEntry, DOCKER_HOSTS};
use common::upstream::{Upstream, UpstreamOpts};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 11, last])
}

fn registry(ca: &TestCa, last: u8) -> Upstream {
    Upstream::start(UpstreamOpts {
        ip: ip(last),
        ca,
        dns_names: Vec::new(),
        auth: None,
    })
}

fn push(up: &Upstream, ca: &TestCa, repo: &str, tag: &str, image: &Image) {
    Pusher::new(&up.url, &ca.pem, None).push_image(repo, tag, image);
}

/// Requests (tag HEADs, GETs) for `repo` in `up`'s access log.
fn requests_for(up: &Upstream, repo: &str) -> usize {
    up.access_log().iter().filter(|e| e.repo() == Some(repo)).count()
}

/// Pulls `library/<name>:<tag>` through regmirror's plain listener
/// (explicit prefix mode) the way a client does: tag, then config and
/// layers; checks every digest. `Err` says what failed.
async fn pull(c: &reqwest::Client, rm: &Regmirror, name: &str, tag: &str, image: &Image) -> Result<(), String> {
    let base = format!("{}/v2/dockerhub/library/{name}", rm.http_url());
    let r = c
        .get(format!("{base}/manifests/{tag}"))
        .header("accept", image.media_type())
        .send()
        .await
        .map_err(|e| format!("tag: {e}"))?;
    if r.status() != 200 {
        return Err(format!("tag: {} {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let manifest = r.bytes().await.map_err(|e| format!("manifest body: {e}"))?;
    if common::sha256_digest(&manifest) != image.manifest_digest {
        return Err("the manifest differs".into());
    }
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let r = c
            .get(format!("{base}/blobs/{}", blob.digest))
            .send()
            .await
            .map_err(|e| format!("blob: {e}"))?;
        if r.status() != 200 {
            return Err(format!("blob {}: {}", blob.digest, r.status()));
        }
        let body = r.bytes().await.map_err(|e| format!("blob body: {e}"))?;
        if body.as_ref() != blob.data.as_slice() {
            return Err(format!("blob {} differs", blob.digest));
        }
    }
    Ok(())
}

fn plain_client() -> reqwest::Client {
    common::init_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// Times regmirror logged a failure of `url`.
fn failures_logged(rm: &Regmirror, url: &str) -> usize {
    rm.log()
        .lines()
        .filter(|l| l.contains("upstream URL failed") && l.contains(url))
        .count()
}

#[test]
fn pulls_go_to_the_second_registry_while_the_first_is_down_and_back_to_it_after() {
    let dir = common::tempdir("failover-ca-");
    let ca = TestCa::new(dir.path(), "failover test CA");
    let first = registry(&ca, 21);
    let second = registry(&ca, 22);
    let a = images::build_image(Format::Oci, "amd64", &[300 * 1024, 50 * 1024]);
    let b = images::build_image(Format::Docker, "amd64", &[200 * 1024]);
    for up in [&first, &second] {
        push(up, &ca, "library/a", "1", &a);
        push(up, &ca, "library/b", "1", &b);
    }
    let (first_url, second_url) = (first.url.clone(), second.url.clone());
    let entry = UpstreamEntry::new("docker.io", DOCKER_HOSTS, "", "dockerhub")
        .urls(&[&first_url, &second_url])
        .ca_file(&ca.pem_path);
    let rm = Regmirror::start(Config::new(ip(20)).with_upstream(entry));
    let c = plain_client();

    // Both up: the first URL serves. (Counts are taken after the pushes,
    // which are in the access logs too.)
    let (first_a, second_a) = (requests_for(&first, "library/a"), requests_for(&second, "library/a"));
    common::block_on(pull(&c, &rm, "a", "1", &a)).unwrap_or_else(|e| panic!("{e}\n{}", rm.log()));
    assert!(
        requests_for(&first, "library/a") > first_a,
        "the first URL was not preferred"
    );
    assert_eq!(
        requests_for(&second, "library/a"),
        second_a,
        "the second URL was asked while the first served"
    );
    let second_b = requests_for(&second, "library/b");

    // The first goes down: every pull succeeds through the second, and the
    // first is not tried on every request (tags always ask upstream).
    drop(first);
    let start = Instant::now();
    for i in 0..10 {
        common::block_on(pull(&c, &rm, "b", "1", &b))
            .unwrap_or_else(|e| panic!("pull {i} with the first URL down: {e}\n{}", rm.log()));
    }
    let secs = start.elapsed().as_secs_f64();
    let tries = failures_logged(&rm, &first_url);
    assert!(tries >= 1, "the first URL's failure was not noticed:\n{}", rm.log());
    // One try per back-off period (2 s, doubling) at most, plus the first.
    let allowed = 1 + (secs / 2.0).ceil() as usize;
    assert!(
        tries <= allowed,
        "the down URL was tried {tries} times in {secs:.1} s of 10 pulls (at most {allowed} expected)"
    );
    assert!(requests_for(&second, "library/b") > second_b);

    // The first comes back (same address, content pushed again): once its
    // back-off is over it serves again. The back-off grows while it was
    // down, so poll for up to its cap (60 s) and a margin.
    let first = registry(&ca, 21);
    push(&first, &ca, "library/a", "1", &a);
    push(&first, &ca, "library/b", "1", &b);
    let first_b = requests_for(&first, "library/b");
    let back = common::wait_until(Duration::from_secs(75), || {
        common::block_on(pull(&c, &rm, "b", "1", &b)).is_ok() && requests_for(&first, "library/b") > first_b
    });
    assert!(back, "the first URL was never used again:\n{}", rm.log());
}

#[test]
fn upstream_traffic_goes_through_tinyproxy_unless_no_proxy_names_the_upstream() {
    let dir = common::tempdir("tinyproxy-ca-");
    let ca = TestCa::new(dir.path(), "proxy test CA");
    let up = registry(&ca, 31);
    let image = images::build_image(Format::Docker, "amd64", &[120 * 1024]);
    push(&up, &ca, "library/proxied", "1", &image);
    let proxy = Tinyproxy::start(ip(30), 3128, &[443]);
    let proxy_url = format!("http://{}", proxy.addr);
    let c = plain_client();

    let through = |env: Vec<(String, String)>, rm_ip: IpAddr| {
        let entry = UpstreamEntry::new("docker.io", DOCKER_HOSTS, &up.url, "dockerhub").ca_file(&ca.pem_path);
        let mut cfg = Config::new(rm_ip).with_upstream(entry);
        cfg.env = env;
        let rm = Regmirror::start(cfg);
        common::block_on(pull(&c, &rm, "proxied", "1", &image)).unwrap_or_else(|e| panic!("{e}\n{}", rm.log()));
    };

    through(vec![("HTTPS_PROXY".into(), proxy_url.clone())], ip(32));
    let target = format!("{}:443 HTTP/1.1", ip(31));
    let connects = proxy.connects();
    assert!(
        connects.iter().any(|t| t == &target),
        "regmirror's upstream traffic did not go through tinyproxy: {connects:?}"
    );

    let before = proxy.connects().len();
    through(
        vec![
            ("HTTPS_PROXY".into(), proxy_url),
            ("NO_PROXY".into(), ip(31).to_string()),
        ],
        ip(33),
    );
    assert_eq!(
        proxy.connects().len(),
        before,
        "NO_PROXY={} did not bypass the proxy: {:?}",
        ip(31),
        proxy.connects()
    );
}
