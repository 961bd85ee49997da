//! Transparent mode end to end: real clients keep their image names
//! (`docker.io/library/x`, `ghcr.io/org/x`, `quay.io/org/x`), a private
//! /etc/hosts points those names at regmirror, and they trust regmirror's CA.
//! Upstream is a real distribution over TLS behind token auth (anonymous
//! pull allowed); its access log is the ground truth of what reached it.

mod common;

use common::clients::Sandbox;
use common::images::{self, Format, Image, MultiImage};
use common::matrix::summarize;
use common::regmirror::{Config, Regmirror};
use common::upstream::{blob_fetch_counts, AccessEntry, Upstream};
use common::{alloc_ip, UpstreamEnv, UpstreamEnvOpts, PUSH_PASSWORD, PUSH_USER, UPSTREAM_HOST};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// regmirror in front of distribution; regmirror is declared first so it
/// stops before its upstream.
struct Stack {
    rm: Regmirror,
    env: UpstreamEnv,
}

impl Stack {
    /// docker.io, ghcr.io and quay.io all map to one distribution instance;
    /// with `creds`, regmirror logs in to the docker.io upstream.
    fn start(creds: bool) -> Stack {
        let env = UpstreamEnv::start(UpstreamEnvOpts::default());
        let mut cfg = Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file);
        if creds {
            cfg = cfg.with_credentials("docker.io", PUSH_USER, PUSH_PASSWORD);
        }
        let rm = Regmirror::start(cfg);
        Stack { rm, env }
    }

    /// A fresh client environment pointed at regmirror.
    fn client(&self) -> Sandbox {
        Sandbox::new(self.rm.ip(), &self.rm.config.client_hostnames(), &self.rm.ca_pem)
    }

    fn up(&self) -> &Upstream {
        &self.env.upstream
    }
}

/// Asserts that since `mark` upstream served no blob and no manifest GET and
/// that every manifest request was a HEAD of a tag (one per pulled repo at least).
#[track_caller]
fn assert_only_tag_heads_since(up: &Upstream, mark: usize, repos: &[&str]) {
    let entries = up.entries_since(mark);
    let blobs: Vec<&AccessEntry> = entries.iter().filter(|e| e.blob_digest().is_some()).collect();
    assert!(blobs.is_empty(), "warm pull reached upstream for blobs: {blobs:#?}");
    let manifests: Vec<&AccessEntry> = entries.iter().filter(|e| e.manifest_ref().is_some()).collect();
    let bad: Vec<&&AccessEntry> = manifests
        .iter()
        .filter(|e| e.method != "HEAD" || e.manifest_ref().is_some_and(|r| r.starts_with("sha256:")))
        .collect();
    assert!(
        bad.is_empty(),
        "warm pull made manifest requests other than HEAD of a tag: {bad:#?}"
    );
    for repo in repos {
        assert!(
            manifests.iter().any(|e| e.repo() == Some(*repo)),
            "no HEAD of the tag of {repo} reached upstream (tags are mutable, regmirror must ask): {entries:#?}"
        );
    }
}

/// Asserts that no blob or manifest of `image` was requested among `entries`.
#[track_caller]
fn assert_untouched(entries: &[AccessEntry], image: &Image, what: &str) {
    let blobs = image.blob_digests();
    let hit: Vec<&AccessEntry> = entries
        .iter()
        .filter(|e| {
            e.blob_digest().is_some_and(|d| blobs.iter().any(|b| b == d))
                || e.manifest_ref() == Some(image.manifest_digest.as_str())
        })
        .collect();
    assert!(hit.is_empty(), "{what} content was fetched from upstream: {hit:#?}");
}

/// Cold pulls with skopeo through all three intercepted registries, then the
/// same images with podman from the warm cache: digests match what was
/// pushed, and the warm pulls only ask upstream for the tags.
#[test]
fn pulls_through_docker_ghcr_and_quay_with_unchanged_names() {
    let s = Stack::start(true);
    let alpha = images::build_image(Format::Docker, "amd64", &[256 * KIB, 512 * KIB, MIB]);
    let ghapp = images::build_image(Format::Oci, "amd64", &[300 * KIB, 200 * KIB]);
    let quayapp = images::build_image(Format::Docker, "amd64", &[400 * KIB, 700 * KIB]);
    s.env.pusher.push_image("library/alpha", "1", &alpha);
    s.env.pusher.push_image("org/ghapp", "1", &ghapp);
    s.env.pusher.push_image("org/quayapp", "1", &quayapp);
    let pulls: [(&str, &str, &Image); 3] = [
        ("docker.io/library/alpha:1", "library/alpha", &alpha),
        ("ghcr.io/org/ghapp:1", "org/ghapp", &ghapp),
        ("quay.io/org/quayapp:1", "org/quayapp", &quayapp),
    ];

    // Cold, skopeo.
    let token = s.env.token.as_ref().expect("token server");
    let tokens_before = token.served();
    let mark = s.up().mark();
    let sk = s.client();
    for (name, _, image) in pulls {
        let (out, digest) = sk.skopeo_copy(name, None);
        out.assert_ok();
        assert_eq!(
            digest.as_deref(),
            Some(image.manifest_digest.as_str()),
            "skopeo digest of {name}"
        );
        assert_eq!(
            sk.skopeo_digest(name).as_deref(),
            Some(image.manifest_digest.as_str()),
            "inspect {name}"
        );
    }
    let cold = s.up().entries_since(mark);
    eprintln!("upstream requests, cold pull of 3 images: {}", summarize(&cold));
    let counts = blob_fetch_counts(&cold);
    for (name, _, image) in pulls {
        for d in image.blob_digests() {
            assert_eq!(counts.get(&d).copied(), Some(1), "{name}: upstream GETs of blob {d}");
        }
    }
    let authed = token
        .requests_since(tokens_before)
        .into_iter()
        .filter(|r| r.user.as_deref() == Some(PUSH_USER) && r.status == 200)
        .count();
    assert!(
        authed > 0,
        "regmirror never used its docker.io credentials at the token server"
    );

    // Warm, podman (another client, another process, other connections).
    let mark = s.up().mark();
    let pm = s.client();
    for (name, _, image) in pulls {
        let (out, digest) = pm.podman_pull(name, None);
        out.assert_ok();
        assert_eq!(
            digest.as_deref(),
            Some(image.manifest_digest.as_str()),
            "podman digest of {name}"
        );
    }
    eprintln!(
        "upstream requests, warm pull of 3 images: {}",
        summarize(&s.up().entries_since(mark))
    );
    let repos: Vec<&str> = pulls.iter().map(|(_, r, _)| *r).collect();
    assert_only_tag_heads_since(s.up(), mark, &repos);
}

/// The other way round: podman pulls cold (it checks diff_ids as it stores
/// layers), skopeo pulls warm without any upstream content GET.
#[test]
fn podman_cold_then_skopeo_warm() {
    let s = Stack::start(false);
    let beta = images::build_image(Format::Oci, "amd64", &[MIB, 300 * KIB]);
    s.env.pusher.push_image("library/beta", "1", &beta);

    let mark = s.up().mark();
    let (out, digest) = s.client().podman_pull("docker.io/library/beta:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(beta.manifest_digest.as_str()));
    let counts = blob_fetch_counts(&s.up().entries_since(mark));
    for d in beta.blob_digests() {
        assert_eq!(counts.get(&d).copied(), Some(1), "upstream GETs of blob {d}");
    }

    let mark = s.up().mark();
    let (out, digest) = s.client().skopeo_copy("docker.io/library/beta:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(beta.manifest_digest.as_str()));
    assert_only_tag_heads_since(s.up(), mark, &["library/beta"]);
}

/// Pulling only linux/arm64 of a multi-platform index fetches the index and
/// the arm64 manifest, config and layers, and nothing of amd64.
#[test]
fn arm64_only_pulls_fetch_no_amd64_content() {
    let s = Stack::start(false);
    let docker: MultiImage = images::build_index(Format::Docker, &["amd64", "arm64"], &[300 * KIB, 600 * KIB]);
    let oci: MultiImage = images::build_index(Format::Oci, &["amd64", "arm64"], &[500 * KIB, 200 * KIB]);
    s.env.pusher.push_index("library/multi", "1", &docker);
    s.env.pusher.push_index("org/multi", "1", &oci);

    // skopeo, Docker manifest list via docker.io.
    let mark = s.up().mark();
    let sk = s.client();
    let (out, digest) = sk.skopeo_copy("docker.io/library/multi:1", Some("arm64"));
    out.assert_ok();
    let arm = docker.platform("arm64");
    assert_eq!(
        digest.as_deref(),
        Some(arm.manifest_digest.as_str()),
        "skopeo copied the arm64 manifest"
    );
    assert_eq!(
        sk.skopeo_digest("docker.io/library/multi:1").as_deref(),
        Some(docker.index_digest.as_str())
    );
    let entries = s.up().entries_since(mark);
    assert_untouched(&entries, docker.platform("amd64"), "amd64");
    let counts = blob_fetch_counts(&entries);
    for d in arm.blob_digests() {
        assert_eq!(counts.get(&d).copied(), Some(1), "upstream GETs of arm64 blob {d}");
    }

    // podman, OCI index via quay.io.
    let mark = s.up().mark();
    let pm = s.client();
    let (out, digest) = pm.podman_pull("quay.io/org/multi:1", Some("arm64"));
    out.assert_ok();
    let arm = oci.platform("arm64");
    // podman 4.3 reports the index digest for an image pulled from an index.
    assert!(
        digest.as_deref() == Some(oci.index_digest.as_str()) || digest.as_deref() == Some(arm.manifest_digest.as_str()),
        "podman digest {digest:?}, index {}, arm64 {}",
        oci.index_digest,
        arm.manifest_digest
    );
    assert_eq!(
        pm.podman_inspect("quay.io/org/multi:1", "{{.Architecture}}").as_deref(),
        Some("arm64")
    );
    let entries = s.up().entries_since(mark);
    assert_untouched(&entries, oci.platform("amd64"), "amd64");
    let counts = blob_fetch_counts(&entries);
    for d in arm.blob_digests() {
        assert_eq!(counts.get(&d).copied(), Some(1), "upstream GETs of arm64 blob {d}");
    }
}

/// Eight clients pull one image at once from a cold cache: upstream serves
/// each blob exactly once, every client gets the right image, and a later
/// pull reuses regmirror's cached upstream token.
#[test]
fn concurrent_cold_pulls_fetch_each_blob_once() {
    const CLIENTS: usize = 8;
    let s = Stack::start(true);
    let big = images::build_image(Format::Docker, "amd64", &[2 * MIB, 2 * MIB, MIB]);
    s.env.pusher.push_image("library/big", "1", &big);
    let sandboxes: Vec<Sandbox> = (0..CLIENTS).map(|_| s.client()).collect();

    let mark = s.up().mark();
    let barrier = std::sync::Barrier::new(CLIENTS);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = sandboxes
            .iter()
            .map(|sb| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    sb.skopeo_copy("docker.io/library/big:1", None)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    for (out, digest) in &results {
        out.assert_ok();
        assert_eq!(digest.as_deref(), Some(big.manifest_digest.as_str()));
    }
    let entries = s.up().entries_since(mark);
    let counts = blob_fetch_counts(&entries);
    for d in big.blob_digests() {
        assert_eq!(
            counts.get(&d).copied(),
            Some(1),
            "upstream GETs of blob {d} (single flight)"
        );
    }
    assert_eq!(
        counts.len(),
        big.blob_digests().len(),
        "unexpected blob GETs: {counts:?}"
    );
    let manifest_gets = entries
        .iter()
        .filter(|e| e.method == "GET" && e.manifest_ref() == Some(big.manifest_digest.as_str()))
        .count();
    assert!(manifest_gets <= 1, "manifest fetched {manifest_gets} times by digest");

    // Token caching: another pull asks upstream for the tag, with the token
    // regmirror already holds for (realm, service, scope, credential).
    let token = s.env.token.as_ref().expect("token server");
    let before = token.served();
    let mark = s.up().mark();
    let (out, digest) = s.client().skopeo_copy("docker.io/library/big:1", None);
    out.assert_ok();
    assert_eq!(digest.as_deref(), Some(big.manifest_digest.as_str()));
    assert_only_tag_heads_since(s.up(), mark, &["library/big"]);
    let authed: Vec<_> = token
        .requests_since(before)
        .into_iter()
        .filter(|r| r.user.as_deref() == Some(PUSH_USER))
        .collect();
    assert!(
        authed.is_empty(),
        "regmirror fetched a new upstream token instead of reusing it: {authed:#?}"
    );
}

/// A plain HTTP client (curl, scripts) sends `Accept: */*`, which names no
/// manifest type; distribution refuses OCI manifests to such a request, so
/// regmirror must ask upstream for every manifest type instead.
#[test]
fn wildcard_accept_still_gets_the_manifest() {
    let s = Stack::start(false);
    let image = images::build_image(Format::Oci, "amd64", &[64 * KIB]);
    s.env.pusher.push_image("library/curl", "1", &image);
    let url = format!("{}/v2/dockerhub/library/curl/manifests/1", s.rm.http_url());
    let (status, body) = common::block_on(async {
        let client = reqwest::Client::new();
        // Upstream authenticates, so regmirror challenges; a script does
        // the token dance with regmirror, which answers it anonymously.
        let challenged = client.get(&url).send().await.expect("regmirror answers");
        assert_eq!(challenged.status(), 401);
        let token = common::anonymous_token(&client, &challenged).await;
        let resp = client
            .get(&url)
            .header("accept", "*/*")
            .bearer_auth(token)
            .send()
            .await
            .expect("regmirror answers");
        (resp.status(), resp.bytes().await.unwrap_or_default())
    });
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(common::sha256_digest(&body), image.manifest_digest);
}

/// A repository upstream refuses to regmirror (anonymous, private repo)
/// fails for the client with the registry's own error, not a TLS or parse
/// error, and nothing of it is cached.
#[test]
fn upstream_refusal_reaches_the_client_as_the_registry_error() {
    let mut opts = UpstreamEnvOpts::default();
    opts.policy.private_prefixes = vec!["private/".into()];
    let env = UpstreamEnv::start(opts);
    let image = images::build_image(Format::Docker, "amd64", &[64 * KIB]);
    env.pusher.push_image("private/secret", "1", &image);
    let rm =
        Regmirror::start(Config::new(alloc_ip()).with_standard_upstreams(UPSTREAM_HOST, env.upstream.ip, &env.ca_file));
    let client = Sandbox::new(rm.ip(), &rm.config.client_hostnames(), &rm.ca_pem);
    let (out, _) = client.skopeo_copy("docker.io/private/secret:1", None);
    common::matrix::assert_registry_error(&out, "authentication required");
    let (out, _) = client.podman_pull("docker.io/private/secret:1", None);
    common::matrix::assert_registry_error(&out, "authentication required");
    let blobs = std::fs::read_dir(rm.cache_dir.join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "nothing of a refused repository is cached");
}

/// Rule 1 with a real registry: a tag asked for again is asked upstream
/// with the ETag of the manifest it named last time, and distribution
/// answers 304 without reading that manifest again; once the tag moves,
/// the next request gets the new manifest at once.
#[test]
fn a_tag_asked_again_is_confirmed_with_a_304_and_a_moved_tag_is_seen_at_once() {
    const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    let s = Stack::start(false);
    let first = images::build_image(Format::Oci, "amd64", &[32 * KIB]);
    let second = images::build_image(Format::Oci, "amd64", &[48 * KIB]);
    assert_ne!(first.manifest_digest, second.manifest_digest);
    s.env.pusher.push_image("library/moving", "1", &first);
    let url = format!("{}/v2/dockerhub/library/moving/manifests/1", s.rm.http_url());
    let client = reqwest::Client::new();
    let token = common::block_on(async {
        let challenged = client.get(&url).send().await.expect("regmirror answers");
        assert_eq!(challenged.status(), 401);
        common::anonymous_token(&client, &challenged).await
    });
    // (status, Docker-Content-Digest, digest of the body) of a GET or HEAD by tag.
    let ask = |method: reqwest::Method| {
        common::block_on(async {
            let resp = client
                .request(method, &url)
                .header("accept", OCI_MANIFEST)
                .bearer_auth(&token)
                .send()
                .await
                .expect("regmirror answers");
            let status = resp.status().as_u16();
            let named = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.bytes().await.unwrap_or_default();
            (status, named, (!body.is_empty()).then(|| common::sha256_digest(&body)))
        })
    };
    let tag_heads = |mark: usize| -> Vec<u16> {
        s.up()
            .entries_since(mark)
            .iter()
            .filter(|e| e.method == "HEAD" && e.repo() == Some("library/moving") && e.manifest_ref() == Some("1"))
            .map(|e| e.status)
            .collect()
    };
    let d1 = Some(first.manifest_digest.clone());

    let mark = s.up().mark();
    assert_eq!(ask(reqwest::Method::GET), (200, d1.clone(), d1.clone()));
    assert_eq!(tag_heads(mark), [200], "the first tag request is a plain HEAD");

    let mark = s.up().mark();
    assert_eq!(ask(reqwest::Method::GET), (200, d1.clone(), d1.clone()));
    assert_eq!(ask(reqwest::Method::HEAD), (200, d1.clone(), None));
    assert_eq!(
        tag_heads(mark),
        [304, 304],
        "a tag asked for again is confirmed with a conditional HEAD"
    );

    // The tag moves upstream: the very next request serves the new manifest.
    s.env.pusher.push_image("library/moving", "1", &second);
    let d2 = Some(second.manifest_digest.clone());
    let mark = s.up().mark();
    assert_eq!(ask(reqwest::Method::HEAD), (200, d2.clone(), None));
    assert_eq!(ask(reqwest::Method::GET), (200, d2.clone(), d2.clone()));
    assert_eq!(
        tag_heads(mark),
        [200, 304],
        "the moved tag is answered in full, then confirmed"
    );
}
