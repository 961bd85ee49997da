//! containerd (`ctr images pull`) through regmirror, in every mode it has:
//! transparent (private /etc/hosts from `regmirror setup hosts` + regmirror's
//! CA) and `hosts.toml` mirrors written by `regmirror setup containerd`, over
//! plain HTTP and over TLS on regmirror's own name (`ca =`).
//!
//! One private containerd serves every case, in sequence, in one #[test]:
//! it is started once and stopped (with its mount namespace) when the test
//! ends. containerd shares fetched content across namespaces, so each case
//! pulls its own image.

mod common;

use common::daemons::Containerd;
use common::images::Format;
use common::matrix::{assert_cold, assert_one_platform, assert_pulled, assert_warm, cold_then_warm, summarize, Stack};

#[test]
fn containerd_transparent_and_hosts_toml() {
    let s = Stack::start();
    let ctrd = Containerd::start();
    transparent(&s, &ctrd);
    hosts_toml_http(&s, &ctrd);
    hosts_toml_tls(&s, &ctrd);
}

/// `ctr images pull docker.io/library/x:1`, `ghcr.io/org/x:1`,
/// `quay.io/org/x:1` and `--platform linux/arm64` of an index, names unchanged.
fn transparent(s: &Stack, ctrd: &Containerd) {
    let sb = s.client();
    let other = s.client();
    for (name, repo, format) in [
        ("docker.io/library/ct-alpha:1", "library/ct-alpha", Format::Docker),
        ("ghcr.io/org/ct-gh:1", "org/ct-gh", Format::Oci),
        ("quay.io/org/ct-quay:1", "org/ct-quay", Format::Docker),
    ] {
        let img = s.image(repo, format);
        cold_then_warm(
            s.up(),
            name,
            repo,
            &img,
            || ctrd.pull(&sb, name, None, None),
            || other.skopeo_copy(name, None),
        );
    }

    // ctr as the warm client: skopeo fills the cache first.
    let img = s.image("library/ct-warm", Format::Oci);
    let name = "docker.io/library/ct-warm:1";
    assert_pulled(name, &other.skopeo_copy(name, None), &img.manifest_digest);
    let mark = s.up().mark();
    assert_pulled(name, &ctrd.pull(&sb, name, None, None), &img.manifest_digest);
    let warm = assert_warm(s.up(), mark, "library/ct-warm", name);
    eprintln!("containerd warm pull, upstream: {}", summarize(&warm));

    // One platform of an index: ctr images ls shows the index digest.
    let idx = s.index("library/ct-multi", Format::Oci);
    let name = "docker.io/library/ct-multi:1";
    let mark = s.up().mark();
    assert_pulled(
        name,
        &ctrd.pull(&sb, name, Some("linux/arm64"), None),
        &idx.index_digest,
    );
    assert_one_platform(s.up(), mark, idx.platform("arm64"), idx.platform("amd64"), name);
    let mark = s.up().mark();
    assert_pulled(
        name,
        &other.skopeo_copy(name, Some("arm64")),
        &idx.platform("arm64").manifest_digest,
    );
    assert_warm(s.up(), mark, "library/ct-multi", name);

    // A tag that does not exist: containerd resolves with HEAD, which has no
    // body to show, so ctr prints its own "not found" (never a TLS error).
    let out = ctrd.ctr(&sb, &["images", "pull", "docker.io/library/ct-alpha:nope"]);
    assert!(!out.success());
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(all.contains("not found") && !all.contains("x509"), "{all}");
}

/// `regmirror setup containerd --proxy PROXY --write DIR`: `http://PROXY:5000`
/// mirrors; every registry name resolves to a dead address.
fn hosts_toml_http(s: &Stack, ctrd: &Containerd) {
    let hosts_dir = s.containerd_hosts_dir(&["--proxy", &s.proxy_ip().to_string()]);
    let sb = s.mirror_client(false, &s.env.ca_file);
    let warm = s.client();
    for (name, repo, format, upstream) in [
        (
            "docker.io/library/ch-alpha:1",
            "library/ch-alpha",
            Format::Docker,
            "docker.io",
        ),
        ("ghcr.io/org/ch-gh:1", "org/ch-gh", Format::Oci, "ghcr.io"),
        ("quay.io/org/ch-quay:1", "org/ch-quay", Format::Oci, "quay.io"),
    ] {
        let img = s.image(repo, format);
        let mark = s.up().mark();
        assert_pulled(
            name,
            &ctrd.pull(&sb, name, None, Some(&hosts_dir)),
            &img.manifest_digest,
        );
        assert_cold(s.up(), mark, &img, name);
        // `?ns=` picked the upstream: regmirror recorded the tag under that
        // upstream's name (all three upstreams share one distribution).
        let tag_record = s.rm.cache_dir.join("meta").join(upstream).join(repo);
        assert!(tag_record.is_dir(), "{name}: no tag record at {}", tag_record.display());
        let mark = s.up().mark();
        assert_pulled(name, &warm.podman_pull(name, None), &img.manifest_digest);
        assert_warm(s.up(), mark, repo, name);
    }
}

/// `regmirror setup containerd --tls --write DIR`: `https://<server.name>`
/// with `ca = ".../ca.pem"`; the client's own trust store does not hold
/// regmirror's CA, so only `ca =` can make the handshake succeed.
fn hosts_toml_tls(s: &Stack, ctrd: &Containerd) {
    let hosts_dir = s.containerd_hosts_dir(&["--tls"]);
    let toml = std::fs::read_to_string(hosts_dir.join("quay.io/hosts.toml")).expect("hosts.toml");
    assert!(
        toml.contains(&format!("[host.\"https://{}\"]", s.name())) && toml.contains("ca = "),
        "{toml}"
    );
    let sb = s.mirror_client(true, &s.env.ca_file);
    let warm = s.client();
    for (name, repo, format) in [
        ("docker.io/library/cs-alpha:1", "library/cs-alpha", Format::Oci),
        ("ghcr.io/org/cs-gh:1", "org/cs-gh", Format::Docker),
        ("quay.io/org/cs-quay:1", "org/cs-quay", Format::Oci),
    ] {
        let img = s.image(repo, format);
        let mark = s.up().mark();
        assert_pulled(
            name,
            &ctrd.pull(&sb, name, None, Some(&hosts_dir)),
            &img.manifest_digest,
        );
        assert_cold(s.up(), mark, &img, name);
        let mark = s.up().mark();
        assert_pulled(name, &warm.skopeo_copy(name, None), &img.manifest_digest);
        assert_warm(s.up(), mark, repo, name);
    }
}
